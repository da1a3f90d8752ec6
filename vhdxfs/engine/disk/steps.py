"""Steps: how one implementation of the engine serves both a synchronous caller and the trio daemon.

Every engine operation that needs I/O (read, write, discard, flush, close, translation when a sector
bitmap must be loaded) is written once, as a generator, a *step*. Where it needs the host it yields an
operation ``(function, *args)`` taken from its ``StepIO`` and receives the function's result back;
an error is thrown back into the step at the same place, so its ``finally`` clauses release locks.

Two drivers run steps:

- ``run_sync`` (here): calls each function directly. With ``SyncIO`` the functions are the HostIO's own
  methods: the offline tools and the Python library, no trio imported.
- the async driver (aio/steps.py): awaits each function. With ``AsyncHost`` payload reads go inline when
  the page cache has them or to a worker thread, payload writes go through the write-back queue, and
  blocking structure I/O (``call``) runs in a worker thread: the trio loop never waits on a disk.

``StepIO`` makes explicit which path each kind of I/O takes: payload through pread_into / pwrite /
write_zeros / punch_hole / truncate / fdatasync, structures (headers, log, sector bitmaps) through ``call``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Protocol

from ..image.host import HostIO

# A step: yields (function, *args) operations, is sent their results, returns the operation's result.
Step = Generator[tuple, Any, Any]


class StepLock(Protocol):
    def release(self) -> None: ...


class StepIO(Protocol):
    """The host operations a step may yield, bound to one image file."""

    host: HostIO

    def pread_into(self, offset: int, view: memoryview) -> Any: ...
    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> Any: ...
    def write_zeros(self, offset: int, length: int) -> Any: ...
    def punch_hole(self, offset: int, length: int) -> Any: ...
    def truncate(self, size: int) -> Any: ...
    def fdatasync(self) -> Any: ...
    def call(self, fn: Callable, *args: Any) -> Any: ...
    def acquire(self, lock: StepLock) -> Any: ...
    def new_lock(self) -> StepLock: ...
    def close(self) -> Any: ...


def run_sync(step: Step) -> Any:
    """Drive ``step`` to its end in this thread; each yielded operation is called directly."""
    try:
        op = step.send(None)
        while True:
            try:
                result = op[0](*op[1:])
            except BaseException as exc:  # thrown back so the step's own clean-up runs
                op = step.throw(exc)
            else:
                op = step.send(result)
    except StopIteration as stop:
        return stop.value


class _NoLock:
    """Synchronous callers are serialised whole (Disk holds one lock per operation): no inner locks."""

    def release(self) -> None:
        return None


class SyncIO:
    """StepIO that calls the HostIO directly: every operation blocks the calling thread."""

    def __init__(self, host: HostIO) -> None:
        self.host = host
        self.pread_into = host.pread_into
        self.pwrite = host.pwrite
        self.write_zeros = host.write_zeros
        self.punch_hole = host.punch_hole
        self.truncate = host.truncate
        self.fdatasync = host.fdatasync

    @staticmethod
    def call(fn: Callable, *args: Any) -> Any:
        return fn(*args)

    @staticmethod
    def acquire(lock: StepLock) -> None:
        return None

    @staticmethod
    def new_lock() -> StepLock:
        return _NoLock()

    def close(self) -> None:
        self.host.close()
