"""The engine for trio: ``AsyncDisk`` moves the bytes of the core's plans with trio (asyncdisk.py) over each
image's ``AsyncHost`` (asynchost.py: inline cached reads, worker threads, the write-back queue)."""

from .asyncdisk import AsyncDisk, close_disks, open_disks
from .asynchost import AsyncHost

__all__ = ["AsyncDisk", "AsyncHost", "close_disks", "open_disks"]
