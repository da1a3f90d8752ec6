"""Write-back queue: a write is acknowledged once queued; one thread applies the queue to the host file.

Why: waiting for a worker thread on every write costs two cross-thread wake-ups per request, about
100 us on a 2-vCPU VM, more than the write itself (benchmarks/run measured writes at half the speed of
reads). A disk may acknowledge a write before it is durable: a drive has a volatile cache, and QEMU with
cache.direct=off acknowledges once the host's page cache holds the data. Only a flush promises
durability, and it still does here: it waits for every queued write first.

The queue is a disk's volatile write cache with these rules:

- one writer thread applies writes in the order they were queued, so overlapping writes keep their order;
- other changes to the file (fdatasync, punching a hole, writing zeros, truncating) are queued as calls
  and run by the same thread in the same order: a flush covers every write queued before it, a punched
  hole is never overwritten by an older write, and each costs one hand-off, not a wait and a hand-off;
- a read waits for the queued writes to the range it reads (a reader sees what was written);
- a failed write (EIO, ENOSPC) is kept: every later write raises it, and the first flush queued after it
  raises it and clears it, so the guest learns of the loss at the latest when it asks for durability (a
  write failing after a flush was queued is kept for the next flush);
- at most ``limit`` bytes wait; a write beyond that waits for room.

Writes hold the caller's buffer until applied, so a mutable buffer is copied when queued; ``bytes`` (what
pyfuse3 hands a write handler) and views of it are kept as they are.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable
from typing import Any

import outcome
import trio

GRANULE = 1 << 20  # reads find the queued writes they overlap through this coarse index of the file
DEFAULT_LIMIT = 16 << 20
_STOP = None


def _owned(data: bytes | bytearray | memoryview) -> memoryview:
    """The bytes to queue: ``bytes`` as they are, anything mutable copied (the caller may reuse it)."""
    view = memoryview(data).cast("B")
    return view if isinstance(view.obj, bytes) else memoryview(bytes(view))


class WriteBack:
    """The queued writes of one host file; the async methods run on the trio thread only."""

    def __init__(self, write: Callable[[int, bytes | memoryview], None], *, limit: int = DEFAULT_LIMIT) -> None:
        self._write = write
        self.limit = limit
        # Writes (seq, offset, view), calls (seq, fn, args, box, report_errors), or _STOP.
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        # Each write gets a sequence number. The trio thread alone writes _issued*, the writer thread
        # alone writes _done*, so neither needs a lock; _done only grows.
        self._issued = self._issued_bytes = 0
        self._done = self._done_bytes = 0
        self._last_write_to: dict[int, int] = {}  # granule -> sequence number of the last write touching it
        self._waiters: list[tuple[int, trio.Event]] = []
        self._wake_at: float = math.inf  # the smallest sequence number a waiter waits for
        self._wake_scheduled = False
        self._errors: list[BaseException] = []  # failed writes not yet reported by a flush, oldest first
        self._errors_lock = threading.Lock()  # the writer thread appends, a flush takes

    @property
    def error(self) -> BaseException | None:
        """The oldest failed write not yet reported by a flush."""
        errors = self._errors
        return errors[0] if errors else None

    @property
    def queued_bytes(self) -> int:
        """Bytes of writes acknowledged and not yet in the file."""
        return self._issued_bytes - self._done_bytes

    @property
    def busy(self) -> bool:
        """True while some queued write has not reached the host file."""
        return self._done < self._issued

    # -- the trio side ------------------------------------------------------------------------------------
    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Queue a write; raises the error of an earlier failed write until a flush has reported it."""
        if self.error is not None:
            raise self.error
        view = _owned(data)
        if not view:
            return
        if self._issued_bytes - self._done_bytes + len(view) > self.limit and self.busy:
            await self._wait_for(self._issued - (self._issued - self._done) // 2)  # about half the queue
        self._enqueue(offset, view)

    def write_now(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Queue a write if that needs no wait (the queue has room, no failed write is pending); else False."""
        if self._errors or self._issued_bytes - self._done_bytes + len(data) > self.limit:
            return False
        if type(data) is not bytes:  # bytes (what pyfuse3 hands a write) are queued as they are
            data = _owned(data)
        if data:
            self._enqueue(offset, data)
        return True

    def _enqueue(self, offset: int, view: bytes | memoryview) -> None:
        n = len(view)
        if self._thread is None:
            self._start()
        self._issued += 1
        self._issued_bytes += n
        seq = self._issued
        first, last = offset // GRANULE, (offset + n - 1) // GRANULE
        if first == last:  # most writes
            self._last_write_to[first] = seq
        else:
            for granule in range(first, last + 1):
                self._last_write_to[granule] = seq
        if len(self._last_write_to) > 4096:
            self._last_write_to = {g: s for g, s in self._last_write_to.items() if s > self._done}
        self._queue.put((seq, offset, view))

    async def call(self, fn: Callable[..., Any], *args: Any, report_errors: bool = False) -> Any:
        """Run ``fn(*args)`` in the writer thread once every write queued so far is applied; its result.

        With ``report_errors`` (a flush), the oldest failed write among those is raised after ``fn`` ran,
        and every failure up to then counts as reported. A cancelled caller stops waiting, but the call
        still runs in its turn.
        """
        if self._thread is None:
            self._start()
        self._issued += 1
        seq = self._issued
        box: list[Any] = []
        self._queue.put((seq, fn, args, box, report_errors))
        await self._wait_for(seq)
        result, error = box
        if error is not None:
            raise error
        return result.unwrap()

    def _start(self) -> None:
        """Before the first item is queued: the writer thread."""
        self._thread = threading.Thread(target=self._run, name="vhdxfs-writeback", daemon=True)
        self._thread.start()

    def settled(self, offset: int, length: int) -> bool:
        """True when no queued write to [offset, offset + length) is still waiting to reach the file."""
        if self._done >= self._issued or length <= 0:  # not busy
            return True
        last = self._last_write_to.get
        return max(last(g, 0) for g in range(offset // GRANULE, (offset + length - 1) // GRANULE + 1)) <= self._done

    async def settle(self, offset: int | None = None, length: int = 0) -> None:
        """Wait until the queued writes to [offset, offset + length) are in the file; all when offset is None."""
        if not self.busy:
            return
        if offset is None:
            target = self._issued
        elif length <= 0:
            return
        else:
            last = self._last_write_to.get
            target = max(last(g, 0) for g in range(offset // GRANULE, (offset + length - 1) // GRANULE + 1))
        if target > self._done:
            await self._wait_for(target)

    def take_error(self) -> BaseException | None:
        """The oldest failed write not yet reported, and every failure so far counted as reported."""
        with self._errors_lock:
            errors, self._errors = self._errors, []
        return errors[0] if errors else None

    async def _wait_for(self, seq: int) -> None:
        # Only a waiter needs the writer thread to wake this trio run: the token is taken here, not per write.
        self._token = trio.lowlevel.current_trio_token()
        event = trio.Event()
        self._waiters.append((seq, event))
        self._wake_at = min(self._wake_at, seq)
        if self._done >= seq:  # the writer may have passed seq before it could see _wake_at
            self._wake()
        await event.wait()

    def _wake(self) -> None:
        """On the trio thread: release the waiters whose writes are done."""
        self._wake_scheduled = False  # before reading _done, so no completion goes unseen
        done = self._done
        waiting = []
        for seq, event in self._waiters:
            if seq <= done:
                event.set()
            else:
                waiting.append((seq, event))
        self._waiters = waiting
        self._wake_at = min((seq for seq, _ in waiting), default=math.inf)

    # -- the writer thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if len(item) == 3:
                seq, offset, view = item
                try:
                    self._write(offset, view)
                except Exception as exc:  # kept for the next write and flush; the writes after it still go on
                    with self._errors_lock:
                        self._errors.append(exc)
                self._done_bytes += len(view)
            else:
                seq, fn, args, box, report_errors = item
                error = self.take_error() if report_errors else None  # of exactly the writes queued before
                box += [outcome.capture(fn, *args), error]
            self._done = seq
            if seq >= self._wake_at and not self._wake_scheduled:
                self._wake_scheduled = True
                assert self._token is not None, "set by the waiter (_wait_for)"
                try:
                    self._token.run_sync_soon(self._wake)
                except trio.RunFinishedError:
                    pass

    def close(self) -> None:
        """Apply every queued write and stop the writer thread (blocking: for when the file closes)."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
