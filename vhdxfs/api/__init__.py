"""vhdxfs as a Python library: ``open`` a virtual disk as a file object, ``create`` images, and the same
for trio code (``open_async``). README "Python API" shows the use; the errors are vhdxfs.errors'."""

from .create import create
from .file import DiskFile, open  # noqa: A004

__all__ = ["DiskFile", "create", "open"]
