"""The engine's public API: everything a front end (mount, NBD server, Python library, CLI tools) uses.

Synchronous core, no trio imported (``import vhdxfs.engine`` stays fast):

- ``Disk.open(path, read_only=..., parent=...)``: read, write, discard, write_zeroes, extents, flush, close;
- image operations: create_image / ImageSpec / create_child, describe, check_image, check_and_repair,
  repair_image, resize, compact, commit;
- host I/O: the HostIO protocol, PosixFile (an OS file, locked), MemoryFile, FileBase.

The async form for trio code is ``vhdxfs.engine.aio.AsyncDisk``: the same steps, driven by trio.
README "Design" draws the layers.
"""

from .compaction import CompactResult, compact
from .disk import Disk
from .hostio import FileBase, HostFactory, HostIO, MemoryFile, PosixFile
from .inspect import check_and_repair, check_image, describe
from .layout import ImageSpec, create_child, create_image, default_block_size
from .merge import CommitResult, commit
from .progress import Progress, no_progress
from .repair import repair_image
from .resizing import ResizeResult, resize
from .translate import Extent, Kind

__all__ = ["CommitResult", "CompactResult", "Disk", "Extent", "FileBase", "HostFactory", "HostIO", "ImageSpec", "Kind",
           "MemoryFile", "PosixFile", "Progress", "ResizeResult", "check_and_repair", "check_image", "commit",
           "compact", "create_child", "create_image", "default_block_size", "describe", "no_progress",
           "repair_image", "resize"]
