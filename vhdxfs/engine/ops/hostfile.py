"""What the data movers ask of a host file beyond the HostIO: where it holds data, and early write-back.

Both only speed things up, never change a result, and do nothing for a HostIO that is not an OS file (the
tests' in-memory and power-cut files):

- ``data_ranges``: SEEK_DATA / SEEK_HOLE. A range of a file that the file system holds as a hole reads as
  zeros without being read: QEMU allocates a VHDX block by extending the file, so the unwritten part of
  every block it allocated is such a hole, and a sparse raw file is mostly holes.
- ``start_writeback``: sync_file_range(SYNC_FILE_RANGE_WRITE) starts writing the dirty pages of a file
  without waiting for them. The final flush of a copy then finds most of the data on the disk already,
  instead of writing all of it after the copy: the disk works while the copy goes on. Durability still
  comes from the flush alone.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable, Iterator

from ..image.host import HostIO
from ..image.posix import PosixFile

SYNC_FILE_RANGE_WRITE = 2


def fd_of(host: HostIO) -> int | None:
    """The descriptor of a host that is an OS file, else None."""
    return host.fd if isinstance(host, PosixFile) and host.fd >= 0 else None


def data_ranges(host: HostIO, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """(file offset, length) of the parts of [offset, offset+length) that may hold data, in order; the
    rest is a hole of the file and reads as zeros. The whole range when the host cannot tell."""
    fd = fd_of(host)
    if fd is None:
        yield offset, length
        return
    yield from fd_data_ranges(fd, offset, length)


def fd_data_ranges(fd: int, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """``data_ranges`` of an open file descriptor."""
    pos, end = offset, offset + length
    while pos < end:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from here to the end of the file
                return
            yield pos, end - pos  # SEEK_DATA unsupported: all of it may be data
            return
        if pos >= end:
            return
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            hole = end
        stop = min(hole, end)
        yield pos, stop - pos
        pos = stop


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range(2) (Python has no os.sync_file_range); None where libc lacks it."""
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call: Callable[[int, int, int, int], int] = fn
    return call


def start_writeback(fd: int | None, offset: int = 0, length: int = 0) -> None:
    """Start writing the dirty pages of [offset, offset+length) (0: to the end) of ``fd``; returns without
    waiting for them. Best effort: a host that cannot just leaves it to the final flush."""
    fn = _sync_file_range() if fd is not None else None
    if fn is not None and fd is not None:
        fn(fd, offset, length, SYNC_FILE_RANGE_WRITE)
