"""``vhdxfs.open``: a VHDX virtual disk as a binary file object, without root or FUSE.

DiskFile is an ``io.RawIOBase``: readinto, write, seek, tell, flush, close, the context manager, and
everything io builds on them (``io.BufferedRandom(disk)``, shutil.copyfileobj, tarfile, zipfile...). It
is a thin layer over the engine's synchronous ``Disk`` (docs/design.md, "The engine API"), so it follows
the mount's rules: a writable open locks the image against every other writer, a read-only one shares the
image with other readers (a dirty log is replayed in memory), a write is durable once ``flush`` returns,
and closing leaves a clean image. Thread-safe: each call is one engine operation under the Disk's lock, and the
position is kept per file object under the same lock.

Like a block device, the size is fixed: reads stop at the end, a write that would cross it is cut
short there (a write wholly past the end raises ENOSPC), ``truncate`` is not supported.
"""

from __future__ import annotations

import errno
import io
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..engine import Disk, Extent, Location
from ..errors import UsageError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

MODES = {"rb": True, "r+b": False, "rb+": False}  # the modes open takes -> read-only


class DiskFile(io.RawIOBase):
    """An open virtual disk: a seekable binary file of ``size`` bytes."""

    def __init__(self, disk: Disk, mode: str) -> None:
        super().__init__()
        self._disk = disk
        self._mode = mode
        self._pos = 0
        self._lock = threading.Lock()

    # -- what it is ---------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self._disk.path)

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def size(self) -> int:
        """The virtual disk's size in bytes."""
        return self._disk.size

    @property
    def block_size(self) -> int:
        return self._disk.block_size

    @property
    def logical_sector_size(self) -> int:
        return self._disk.logical_sector_size

    def chain(self) -> list[Location]:
        """The image and its parents, child first."""
        return list(self._disk.chain())

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return not self._disk.read_only

    def seekable(self) -> bool:
        return True

    # -- position -----------------------------------------------------------------------------------------
    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check_open()
        with self._lock:
            if whence == os.SEEK_SET:
                pos = offset
            elif whence == os.SEEK_CUR:
                pos = self._pos + offset
            elif whence == os.SEEK_END:
                pos = self.size + offset
            else:
                raise ValueError(f"invalid whence ({whence})")
            if pos < 0:
                raise OSError(errno.EINVAL, "negative seek position", self.name)
            self._pos = pos
            return pos

    # -- I/O ----------------------------------------------------------------------------------------------
    def readinto(self, buffer: WriteableBuffer) -> int:
        self._check_open()
        view = memoryview(buffer).cast("B")
        with self._lock:
            n = max(0, min(len(view), self.size - self._pos))
            if n:
                view[:n] = self._disk.read(self._pos, n)
                self._pos += n
            return n

    def write(self, data: ReadableBuffer) -> int:
        self._check_open()
        with self._lock:
            n = self.pwrite(self._pos, data)
            self._pos += n
            return n

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end), the position untouched: for threads sharing
        one file object, which share its position too."""
        self._check_open()
        length = max(0, min(length, self.size - offset))
        return bytes(self._disk.read(offset, length)) if length else b""

    def pwrite(self, offset: int, data: ReadableBuffer) -> int:
        """Write ``data`` at ``offset``, the position untouched; returns the bytes written (cut at the end)."""
        self._check_open()
        if self._disk.read_only:
            raise io.UnsupportedOperation(f"{self.name}: opened read-only (mode {self._mode!r})")
        view = memoryview(data).cast("B")
        if view and offset >= self.size:
            raise OSError(errno.ENOSPC, "write past the end of the virtual disk", self.name)
        n = min(len(view), self.size - offset)
        if n:
            self._disk.write(offset, view[:n])
        return n

    def flush(self) -> None:
        """Every write so far is durable when this returns (as fsync on the mounted raw file)."""
        if not self.closed and not self._disk.read_only:
            self._disk.flush()

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation(f"{self.name}: a virtual disk has a fixed size (use `vhdxfs resize`)")

    def fileno(self) -> int:
        raise io.UnsupportedOperation(f"{self.name}: a virtual disk has no file descriptor")

    def close(self) -> None:
        """Flush, apply the log, leave a clean image, release the lock."""
        if not self.closed:
            try:
                super().close()  # io's close flushes first
            finally:
                self._disk.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed disk file")

    # -- beyond a plain file ------------------------------------------------------------------------------
    def discard(self, offset: int, length: int) -> None:
        """The range reads as zeros afterwards; whole blocks give their space back (like BLKDISCARD)."""
        self._check_open()
        self._disk.discard(offset, length)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._check_open()
        self._disk.write_zeroes(offset, length, unmap=unmap)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """What holds each range: ``Extent(offset, length, kind, layer, depth, file_offset)``, kind DATA,
        ZERO or HOLE; ``layer`` is the file of the chain that answered."""
        self._check_open()
        return iter(self._disk.extents(offset, length))


def open(path: str | os.PathLike[str], mode: str = "rb", *,  # noqa: A001
         parent: str | os.PathLike[str] | None = None) -> DiskFile:
    """Open the virtual disk of the VHDX image ``path``: mode "rb" (read-only) or "r+b" (read-write).

    ``parent``: where a differencing image's parent is, when its locator does not find it. Errors are
    VhdxError (with errno): ImageLockedError when another process writes the image, CorruptImageError,
    ParentError, HostIOError...
    """
    read_only = MODES.get(mode)
    if read_only is None:
        raise UsageError(f"mode {mode!r}: use 'rb' or 'r+b' (a virtual disk is binary, and open neither creates "
                         "nor truncates one: see vhdxfs.create)", path=path, field="mode")
    return DiskFile(Disk.open(path, read_only=read_only, parent=parent), mode)
