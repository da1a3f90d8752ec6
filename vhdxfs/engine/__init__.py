"""The engine's public API: everything a front end (mount, NBD server, Python library, CLI tools) uses.

Synchronous core, no trio imported (``import vhdxfs.engine`` stays fast):

- ``Disk.open(path, read_only=..., parent=...)``: read, write, discard, write_zeroes, extents, flush, close;
- image operations: create_image / ImageSpec / create_child, describe, check_image, check_and_repair,
  repair_image, resize, compact, commit;
- host I/O: the HostIO protocol, PosixFile (an OS file, locked), MemoryFile, FileBase.

The async form for trio code is ``vhdxfs.engine.aio.AsyncDisk``: the same steps, driven by trio.
README "Design" draws the layers.
"""

from .disk import Disk
from .hostio import FileBase, HostFactory, HostIO, MemoryFile, PosixFile
from .translate import Extent, Kind

# The image operations load on first use: a command imports only what it runs (fast start).
_LAZY = {
    "CompactResult": "compaction", "compact": "compaction",
    "check_and_repair": "inspect", "check_image": "inspect", "describe": "inspect",
    "ImageSpec": "layout", "create_child": "layout", "create_image": "layout", "default_block_size": "layout",
    "CommitResult": "merge", "commit": "merge",
    "Progress": "progress", "no_progress": "progress",
    "repair_image": "repair",
    "ResizeResult": "resizing", "resize": "resizing",
}

__all__ = ["Disk", "Extent", "FileBase", "HostFactory", "HostIO", "Kind", "MemoryFile", "PosixFile", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vhdxfs.engine' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
