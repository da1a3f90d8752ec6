"""The engine's public API: everything a front end (mount, NBD server, Python library, CLI tools) uses.

Synchronous core, no trio imported (``import vhdxfs.engine`` stays fast):

- ``Disk.open(path, read_only=..., parent=...)``: read, write, discard, write_zeroes, extents, flush, close;
- image operations: create_image / ImageSpec / create_child, describe, check_image, check_and_repair,
  repair_image, resize, compact, commit, convert;
- host I/O: the HostIO protocol, PosixFile (an OS file, locked), MemoryFile, FileBase.

The async form for trio code is ``vhdxfs.engine.aio.AsyncDisk``: the same contract, driven by trio.
docs/design.md ("Layers") draws the layers.
"""

from typing import Any

from .disk.runs import Extent, Kind
from .disk.sync import Disk
from .image.host import FileBase, HostFactory, HostIO, MemoryFile
from .image.posix import PosixFile

# The image operations load on first use: a command imports only what it runs (fast start).
_LAZY = {
    "CompactResult": "ops.compact", "compact": "ops.compact",
    "check_and_repair": "ops.check", "check_image": "ops.check", "describe": "ops.check",
    "ImageSpec": "ops.create", "create_child": "ops.create", "create_image": "ops.create",
    "default_block_size": "ops.create",
    "CommitResult": "ops.commit", "commit": "ops.commit",
    "ConvertResult": "ops.convert", "convert": "ops.convert",
    "Progress": "ops.progress", "no_progress": "ops.progress",
    "repair_image": "ops.repair",
    "ResizeResult": "ops.resize", "resize": "ops.resize",
}

__all__ = ["Disk", "Extent", "FileBase", "HostFactory", "HostIO", "Kind", "MemoryFile", "PosixFile", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vhdxfs.engine' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
