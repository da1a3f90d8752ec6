"""PosixFile: an image file on the host, opened through the OS, with its OFD lock held.

Locks are Linux open-file-description (OFD) record locks on the whole file: per open file, not per
process, and on NFS (via NLM) and CIFS they become byte-range locks the server enforces, unlike flock.
QEMU uses the same kind of lock on a few bytes of the image, so a mounted image also keeps QEMU out. A lock
changes mode on the descriptor that holds it (``set_writable``), so a live operation never lets go of a
file it freezes or thaws.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import struct
from collections.abc import Callable
from pathlib import Path

from ...errors import HostIOError, ImageLockedError
from .host import FileBase

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int]:
    """libc's fallocate(2) (Python has no os.fallocate with mode flags); looked up on first use."""
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fallocate: Callable[[int, int, int, int], int] = libc.fallocate
    return fallocate


class PosixFile(FileBase):
    """An image file on the host, opened read-only or read-write, with the matching lock held."""

    path: Path

    def __init__(self, path: str | os.PathLike[str], *, writable: bool, lock: bool = True) -> None:
        self.path = Path(path)
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except OSError as exc:
            raise HostIOError(exc.strerror or str(exc), path=self.path, errno=exc.errno) from None
        self.punch_supported = True
        self.locked = lock
        self._fd_writable = writable
        if lock:
            try:
                self._lock(exclusive=writable)
            except BaseException:
                os.close(self.fd)
                raise

    def _lock(self, *, exclusive: bool) -> None:
        try:
            self._set_lock(self.fd, fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                from ...service.records import held_message  # names the daemon holding it (its pid record)
                how = "written" if exclusive else "read"
                raise ImageLockedError(held_message(self.path) or f"image is in use by another process (locked; "
                                       f"cannot be {how} now)", path=self.path) from None
            raise self._error(exc) from None

    @staticmethod
    def _set_lock(fd: int, lock_type: int) -> None:
        """An OFD lock of ``lock_type`` on the whole file through ``fd`` (OSError if refused)."""
        # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid (0 for OFD).
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", lock_type, os.SEEK_SET, 0, 0, 0))

    def set_writable(self, writable: bool) -> None:
        """Change what this open may do with the file locked all along: read-only turns the exclusive lock
        into a shared one on the same descriptor (an OFD lock changes mode in place, so no other process
        can take the file in between); writable takes the exclusive lock, on a descriptor open for writing
        (reopened first, holding a shared lock meanwhile). Refused with ImageLockedError, and nothing
        changed, while another process reads the file."""
        if writable == self.writable:
            return
        if not writable:
            if self.locked:
                self._lock(exclusive=False)
            self.writable = False
            return
        if not self._fd_writable:
            self._reopen_for_writing()
        if self.locked:
            self._lock(exclusive=True)
        self.writable = True

    def _reopen_for_writing(self) -> None:
        """Open the file again for writing and put the new open under the same descriptor number (dup2).

        Readers on other threads hold ``self.fd`` while this runs; closing that number and taking another
        would fail their reads (EBADF) or, once the number is reused by another open, read another file.
        dup2 swaps the open behind the number in one step: a read already in the kernel finishes on the old
        open, a later one uses the new. Locked, the new open takes a shared lock before the old one lets go
        of its own, so no other process can take the file in between."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise self._error(exc) from None
        try:
            old, new = os.fstat(self.fd), os.fstat(fd)
            if (old.st_dev, old.st_ino) != (new.st_dev, new.st_ino):
                raise HostIOError("the file was replaced while it was open (its path names another file now)",
                                  path=self.path, errno=errno.ESTALE)
            if self.locked:
                self._set_lock(fd, fcntl.F_RDLCK)  # ours on the old open is shared too: no conflict, no gap
                # Let go of the old open's lock now: a read still in flight keeps that open alive a moment
                # after dup2, and its lock would stand in the way of the exclusive one taken next.
                self._set_lock(self.fd, fcntl.F_UNLCK)
            os.dup2(fd, self.fd)
            self._fd_writable = True
        finally:
            os.close(fd)  # the new open lives on under self.fd (an OFD lock belongs to the open, not the number)

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Through SEEK_DATA and SEEK_HOLE: the holes of a sparse file are never read (a large BAT of a
        young differencing image is mostly one). Where the file system cannot tell, all of it."""
        out, pos, end = [], offset, offset + length
        try:
            while pos < end:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
                if start >= end:
                    break
                stop = min(os.lseek(self.fd, start, os.SEEK_HOLE), end)
                out.append((start, stop))
                pos = stop
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from pos to the end of the file
                return out
            return [(offset, length + offset)]
        return out

    def _error(self, exc: OSError) -> HostIOError:
        return HostIOError(exc.strerror or str(exc), path=self.path, errno=exc.errno)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def pread_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` from ``offset``; past the end of the file it reads zeros. The read primitive."""
        done = 0
        try:
            while done < len(view):
                n = os.preadv(self.fd, [view[done:]], offset + done)
                if n == 0:
                    view[done:] = bytes(len(view) - done)
                    return
                done += n
        except OSError as exc:
            raise self._error(exc) from None

    def read_cached(self, offset: int, view: memoryview | bytearray) -> bool:
        """Fill ``view`` from the page cache without blocking (RWF_NOWAIT); False if the disk is needed."""
        if not _NOWAIT or self.fd < 0:
            return False
        try:
            return os.preadv(self.fd, (view,), offset, _NOWAIT) == len(view)
        except OSError:
            return False  # EAGAIN: not cached; EOPNOTSUPP: no RWF_NOWAIT here; pread_into decides

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        try:
            view = memoryview(data)
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as exc:
            raise self._error(exc) from None

    def fdatasync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise self._error(exc) from None

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise self._error(exc) from None

    def punch_hole(self, offset: int, length: int) -> bool:
        """Return the range's space to the host; it reads as zeros after. False if the host can't."""
        if not self.punch_supported or length <= 0:
            return False
        if _fallocate()(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
            self.punch_supported = False
            return False
        raise HostIOError(os.strerror(err), path=self.path, errno=err)

    def allocate(self, offset: int, length: int) -> None:
        """Reserve host space (fixed images); falls back to a sparse extension where unsupported."""
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise self._error(exc) from None
            super().allocate(offset, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
