"""The engine for trio: ``AsyncDisk`` moves the bytes of the core's plans with trio (asyncdisk.py) over each
image's ``AsyncHost`` (asynchost.py: inline cached reads, worker threads, the write-back queue)."""

from .asyncdisk import AsyncDisk
from .asynchost import AsyncHost
from .disks import close_disks, open_disks

__all__ = ["AsyncDisk", "AsyncHost", "close_disks", "open_disks"]
