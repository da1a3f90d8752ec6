"""The engine for trio: AsyncDisk runs the synchronous core's steps with trio (see engine/steps.py)."""

from .disk import AsyncDisk, close_disks, open_disks

__all__ = ["AsyncDisk", "close_disks", "open_disks"]
