"""The engine's public API: everything a front end (mount, NBD server, Python library, CLI tools) uses.

Synchronous core, no trio imported (``import vhdxfs.engine`` stays fast):

- ``Disk.open(path, read_only=..., parent=...)``: read, write, discard, write_zeroes, extents, flush, close;
- image operations: create_image / ImageSpec / create_child, describe, check_image, check_and_repair,
  repair_image, resize, compact, commit, convert;
- host I/O: the HostIO protocol, PosixFile (an OS file, locked), MemoryFile, FileBase;
- where an image lives: Location (a Path, or an S3Location for ``s3://BUCKET/KEY``), parse_location,
  is_remote, absolute_location and location_key (one spelling per image); the S3 client's settings
  (configure_s3) and upload (upload_file), loaded on first use.

The async form for trio code is ``vhdxfs.engine.aio.AsyncDisk``: the same contract, driven by trio.
docs/design.md ("Layers") draws the layers.
"""

from typing import Any

from .disk.runs import Extent, Kind
from .disk.sync import Disk
from .image.host import FileBase, HostFactory, HostIO, MemoryFile
from .image.locations import Location, S3Location, is_remote
from .image.locations import absolute as absolute_location
from .image.locations import exists as location_exists
from .image.locations import parse as parse_location
from .image.locations import real as location_key
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
    "configure_s3": "image.s3client", "upload_file": "image.s3client",
}

__all__ = ["Disk", "Extent", "FileBase", "HostFactory", "HostIO", "Kind", "Location", "MemoryFile", "PosixFile",
           "S3Location", "absolute_location", "is_remote", "location_exists", "location_key", "parse_location",
           *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vhdxfs.engine' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
