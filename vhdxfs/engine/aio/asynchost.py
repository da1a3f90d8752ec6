"""AsyncHost: the StepIO (engine/steps.py) of one image file for the trio daemon.

Payload reads go inline when the page cache holds them (RWF_NOWAIT), else to a worker thread; payload
writes are queued for the write-back thread (writeback.py: acknowledged once queued, durable at the next
fdatasync, like a disk's volatile cache); fdatasync, hole punching, zeroing and shrinking are queued
behind them, in order. Structure I/O (headers, log, sector bitmaps: ``call``) runs in a worker thread,
directly on the HostIO. So the trio loop never waits on a disk, and there is one way off the trio thread
for each kind of I/O.
"""

from __future__ import annotations

import errno
import queue
import threading
from collections.abc import Callable
from typing import Any

import outcome
import trio

from ...errors import HostIOError
from ..disk.steps import StepLock
from ..image.host import HostIO
from .writeback import DEFAULT_LIMIT, WriteBack


class IOPool:
    """Worker threads for blocking file I/O, cheaper per call than trio.to_thread (no limiter, no cache).

    The calling task parks with wait_task_rescheduled and a worker hands the outcome back through the trio
    token. Disk I/O cannot be interrupted, so a cancelled caller still waits for its call to finish.
    """

    def __init__(self, workers: int = 16) -> None:
        self.workers = workers
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], trio.lowlevel.TrioToken,
                                             trio.lowlevel.Task]] = queue.SimpleQueue()
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
            # An idle worker keeps nothing of its last call: not the file, buffers and disk behind it (gone
            # before the caller resumes, so nothing of a disk outlives its close), nor the trio run.
            del fn, args
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:
                pass
            del token, task, result

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._started < self.workers:
            self._ensure_started()
        await trio.lowlevel.checkpoint_if_cancelled()
        self._queue.put((fn, args, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task()))
        return await trio.lowlevel.wait_task_rescheduled(lambda _raise_cancel: trio.lowlevel.Abort.FAILED)


IO_POOL = IOPool()


class AsyncHost:
    """One HostIO as the async driver sees it: payload through the write-back queue, the rest in workers."""

    def __init__(self, host: HostIO, *, writeback_limit: int | None = None) -> None:
        self.host = host
        self.path = host.path
        self._limit = writeback_limit or DEFAULT_LIMIT
        self.writeback = WriteBack(host.pwrite, limit=self._limit) if host.writable else None

    async def pread_into(self, offset: int, view: memoryview) -> None:
        """Read into ``view`` (after the queued writes to it): inline when the page cache has it, else in a
        worker thread."""
        if self.writeback is not None and self.writeback.busy:
            await self.writeback.settle(offset, len(view))
        if not self.host.read_cached(offset, view):
            await IO_POOL.run(self.host.pread_into, offset, view)

    def read_now(self, offset: int, length: int) -> bytearray | None:
        """The bytes at ``offset`` if the page cache has them and no queued write to them waits, else None."""
        if self.writeback is not None and not self.writeback.settled(offset, length):
            return None
        buf = bytearray(length)
        return buf if self.host.read_cached(offset, buf) else None  # the buffer itself: no view to make

    async def pread(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        await self.pread_into(offset, memoryview(buf))
        return buf

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Queue a write (see writeback.py); an earlier queued write that failed raises here."""
        if self.writeback is None:
            raise HostIOError("file is open read-only", path=self.path, errno=errno.EBADF)
        await self.writeback.write(offset, data)

    def write_now(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Queue a write if that needs no wait; False otherwise (then ``pwrite``)."""
        return self.writeback is not None and self.writeback.write_now(offset, data)

    async def fdatasync(self) -> None:
        """Make every write so far durable; raises the error of a queued write that failed since the last."""
        if self.writeback is None:
            await IO_POOL.run(self.host.fdatasync)
            return
        await self.writeback.call(self.host.fdatasync, report_errors=True)

    async def _in_order(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Changes other than writes run after the queued writes, in the writer thread (writeback.py)."""
        if self.writeback is None:
            return await IO_POOL.run(fn, *args)
        return await self.writeback.call(fn, *args)

    async def truncate(self, size: int) -> None:
        """Change the file's size (growing for new blocks' space)."""
        if self.writeback is not None and size >= self.host.size():
            # Growing cannot undo a queued write (none reaches past the size the file had when it was
            # queued), so a new block's space need not wait for the queue to drain.
            await IO_POOL.run(self.host.truncate, size)
        else:
            await self._in_order(self.host.truncate, size)

    async def punch_hole(self, offset: int, length: int) -> bool:
        punched: bool = await self._in_order(self.host.punch_hole, offset, length)
        return punched

    async def write_zeros(self, offset: int, length: int) -> None:
        await self._in_order(self.host.write_zeros, offset, length)

    @staticmethod
    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        """Blocking structure I/O (headers, log, sector bitmaps) in a worker thread."""
        return await IO_POOL.run(fn, *args)

    @staticmethod
    async def acquire(lock: StepLock) -> None:
        assert isinstance(lock, trio.Lock), "a lock of this driver (new_lock)"
        try:  # a free lock without trio.Lock.acquire's trip through the scheduler (a flush takes one each time)
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()

    @staticmethod
    def new_lock() -> StepLock:
        return trio.Lock()

    def set_writable(self, writable: bool) -> None:
        """Writable (the target of a live merge) gets a write-back queue; read-only (a frozen layer) stops
        its queue, whose writes must be flushed already. The host file's lock follows (HostIO.set_writable)."""
        self.host.set_writable(writable)
        if writable and self.writeback is None:
            self.writeback = WriteBack(self.host.pwrite, limit=self._limit)
        elif not writable:
            self.stop_writeback()

    def stop_writeback(self) -> None:
        """Apply the queued writes and stop the writer thread (blocking; nothing is made durable)."""
        if self.writeback is not None:
            self.writeback.close()
            self.writeback = None

    async def close(self) -> None:
        """Close the file once the queued writes are in it (not durable: flush first for that)."""
        self.stop_writeback()
        self.host.close()
