"""vhdxfs: VHDX virtual disks as raw files (FUSE mount, NBD server) and as Python file objects.

    import vhdxfs
    with vhdxfs.open("disk.vhdx", "r+b") as disk: ...    # README "Python API"

``open``, ``create`` and ``open_async`` load on first use, so importing vhdxfs costs next to nothing
(the command line starts fast, and trio is imported only by what needs it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ loads them
    from .api.asyncfile import open_async
    from .api.create import create
    from .api.file import DiskFile, open  # noqa: A004

__version__ = "0.1.0"
__all__ = ["DiskFile", "create", "open", "open_async"]

_LAZY = {"open": "vhdxfs.api.file", "DiskFile": "vhdxfs.api.file", "create": "vhdxfs.api.create",
         "open_async": "vhdxfs.api.asyncfile"}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vhdxfs' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
