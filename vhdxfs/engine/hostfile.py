"""The one place that touches the OS file: pread, pwrite, fdatasync, truncate, punch hole, locks.

Every method is synchronous; the ``a*`` twins run it in a worker thread so the trio loop never waits on
the disk, except ``apwrite``, which queues the write (writeback.py: acknowledged once queued, durable at
the next ``afdatasync``, like a disk's volatile cache). Tests subclass HostFile to inject faults (lost
writes, torn writes, ENOSPC, EIO) at this seam: the queue applies writes through ``pwrite``.

Locks are Linux open-file-description (OFD) record locks on the whole file: per open file, not per
process, and on NFS (via NLM) and CIFS they become byte-range locks the server enforces, unlike flock.
QEMU uses the same kind of lock on a few bytes of the image, so a mounted image also keeps QEMU out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import queue
import struct
import threading
from pathlib import Path

import outcome
import trio

from ..errors import HostIOError, ImageLockedError
from .writeback import WriteBack

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class IOPool:
    """Worker threads for blocking file I/O, cheaper per call than trio.to_thread (no limiter, no cache).

    The calling task parks with wait_task_rescheduled and a worker hands the outcome back through the trio
    token. Disk I/O cannot be interrupted, so a cancelled caller still waits for its call to finish.
    """

    def __init__(self, workers: int = 16) -> None:
        self.workers = workers
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._started = 0
        self._lock = threading.Lock()

    def _ensure_started(self) -> None:
        with self._lock:
            while self._started < self.workers:
                threading.Thread(target=self._work, name="vhdxfs-io", daemon=True).start()
                self._started += 1

    def _work(self) -> None:
        while True:
            fn, args, token, task = self._queue.get()
            result = outcome.capture(fn, *args)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:
                pass

    async def run(self, fn, *args):
        if self._started < self.workers:
            self._ensure_started()
        await trio.lowlevel.checkpoint_if_cancelled()
        self._queue.put((fn, args, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task()))
        return await trio.lowlevel.wait_task_rescheduled(lambda _raise_cancel: trio.lowlevel.Abort.FAILED)


IO_POOL = IOPool()
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


class HostFile:
    """An image file on the host, opened read-only or read-write, with the matching lock held."""

    _inline_reads = False  # page-cache reads on the trio thread (set by __init__ when they are possible)

    def __init__(self, path: str | os.PathLike, *, writable: bool, lock: bool = True) -> None:
        self.path = Path(path)
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except OSError as exc:
            raise HostIOError(exc.strerror or str(exc), path=self.path, errno=exc.errno) from None
        self.punch_supported = True
        self._inline_reads = bool(_NOWAIT) and type(self).pread_into is HostFile.pread_into
        self.writeback = WriteBack(self.pwrite) if writable else None
        if lock:
            try:
                self._lock(exclusive=writable)
            except BaseException:
                os.close(self.fd)
                raise

    def _lock(self, *, exclusive: bool) -> None:
        lock_type = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
        # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid (0 for OFD).
        arg = struct.pack("hhqqi4x", lock_type, os.SEEK_SET, 0, 0, 0)
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, arg)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                how = "written" if exclusive else "read"
                raise ImageLockedError(f"image is in use by another process (locked; cannot be {how} now)",
                                       path=self.path) from None
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> HostIOError:
        return HostIOError(exc.strerror or str(exc), path=self.path, errno=exc.errno)

    # -- synchronous primitives -------------------------------------------------------------------------
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        """Read exactly ``length`` bytes; what lies past the end of the file reads as zeros."""
        buf = bytearray(length)
        self.pread_into(offset, memoryview(buf))
        return bytes(buf)

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
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
            self.punch_supported = False
            return False
        raise HostIOError(os.strerror(err), path=self.path, errno=err)

    def write_zeros(self, offset: int, length: int) -> None:
        """Make a range read as zeros: punch where the host allows it, else write zeros."""
        if self.punch_hole(offset, length):
            return
        chunk = bytes(min(length, 1 << 20))
        while length > 0:
            n = min(length, len(chunk))
            self.pwrite(offset, chunk[:n])
            offset += n
            length -= n

    def allocate(self, offset: int, length: int) -> None:
        """Reserve host space (fixed images); falls back to a sparse extension where unsupported."""
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise self._error(exc) from None
            if self.size() < offset + length:
                self.truncate(offset + length)

    def close(self) -> None:
        """Close the file once the queued writes are in it (not durable: flush first for that)."""
        if self.writeback is not None:
            self.writeback.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- the same, off the trio loop ---------------------------------------------------------------------
    def _read_cached(self, offset: int, view: memoryview) -> bool:
        """Fill ``view`` from the page cache without blocking (RWF_NOWAIT); False if the disk is needed.

        Subclasses that replace ``pread_into`` (fault injection) are never short-cut.
        """
        if not self._inline_reads or self.fd < 0:
            return False
        try:
            return os.preadv(self.fd, [view], offset, _NOWAIT) == len(view)
        except OSError:
            return False  # EAGAIN: not cached; EOPNOTSUPP: no RWF_NOWAIT here; the worker path decides

    async def apread_into(self, offset: int, view: memoryview) -> None:
        """Read into ``view`` (after the queued writes to it): inline when the page cache has it, else in a
        worker thread."""
        if self.writeback is not None and self.writeback.busy:
            await self.writeback.settle(offset, len(view))
        if not self._read_cached(offset, view):
            await IO_POOL.run(self.pread_into, offset, view)

    async def apread(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        await self.apread_into(offset, memoryview(buf))
        return buf

    async def apwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Queue a write (see writeback.py); an earlier queued write that failed raises here."""
        if self.writeback is None:
            raise HostIOError("file is open read-only", path=self.path, errno=errno.EBADF)
        await self.writeback.write(offset, data)

    async def afdatasync(self) -> None:
        """Make every write so far durable; raises the error of a queued write that failed since the last."""
        if self.writeback is None:
            await IO_POOL.run(self.fdatasync)
            return
        await self.writeback.call(self.fdatasync, report_errors=True)

    async def _in_order(self, fn, *args):
        """Changes other than writes run after the queued writes, in the writer thread (writeback.py)."""
        if self.writeback is None:
            return await IO_POOL.run(fn, *args)
        return await self.writeback.call(fn, *args)

    async def atruncate(self, size: int) -> None:
        if self.writeback is not None and size >= self.size():
            # Growing cannot undo a queued write (none reaches past the size the file had when it was
            # queued), so a new block's space need not wait for the queue to drain.
            await IO_POOL.run(self.truncate, size)
        else:
            await self._in_order(self.truncate, size)

    async def apunch_hole(self, offset: int, length: int) -> bool:
        return await self._in_order(self.punch_hole, offset, length)

    async def awrite_zeros(self, offset: int, length: int) -> None:
        await self._in_order(self.write_zeros, offset, length)
