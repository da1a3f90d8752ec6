"""What the mount adds to the control channel's commands (engine/live/commands.py): after a live resize,
the raw file's new size, told to the kernel before the command answers.

The kernel keeps a raw file's attributes for an hour (operations.py, attr_timeout), so without a word from
us a stat, ``losetup -c`` or QEMU would see the old size for that long. ``invalidate_inode`` (attributes
only) makes its next stat ask the daemon again; it cannot block here: there is no writeback cache, so the
kernel has no dirty pages of ours to write first.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import pyfuse3

from ..engine.live import Served
from .operations import RawFilesOperations

log = logging.getLogger("vhdxfs.mount")


def size_notifier(ops: RawFilesOperations) -> Callable[[Served], Awaitable[None]]:
    """The ``resized`` hook of the command table for the mount's raw files."""

    async def resized(served: Served) -> None:
        f = ops.by_name.get(served.name.encode())
        if f is None:
            return
        try:
            pyfuse3.invalidate_inode(f.inode, attr_only=True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel has not looked the file up; nothing cached
                log.warning("%s: cannot tell the kernel the new size: %s", served.name, exc)

    return resized
