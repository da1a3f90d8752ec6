"""Steps: how the core's work that needs I/O is written once for a synchronous caller and the trio daemon.

The core's contract with the drivers is resolve + guard (core.py): plans, whose bytes the drivers move
themselves. What a plan cannot be made without (a sector bitmap loaded, a block allocated, a new
DataWriteGuid), and write-zeroes, extents, flush and close, are written once each as a generator, a
*step*. Where it needs the host it yields an operation ``(function, *args)`` taken from its ``StepIO``
and receives the function's result back; an error is thrown back into the step at the same place, so
its ``finally`` clauses release locks.

Two drivers run steps:

- ``run_sync`` (here): calls each function directly. With ``SyncIO`` the functions are the HostIO's own
  methods: the offline tools and the Python library (sync.py), no trio imported.
- ``drive`` (aio/asyncdisk.py): awaits each function. With ``AsyncHost`` (aio/asynchost.py) hole
  punching, zeroing and fdatasync go through the write-back queue in order, and blocking structure I/O
  (``call``) runs in a worker thread: the trio loop never waits on a disk.

``StepIO`` makes explicit which path each kind of I/O takes: payload through pread_into / pwrite /
write_zeros / punch_hole / truncate / fdatasync, structures (headers, log, sector bitmaps) through ``call``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Protocol, TypeVar

from ..image.host import HostIO

T = TypeVar("T")
# An operation: (function, *args), taken from the step's StepIO.
Op = tuple[Any, ...]
# A step: yields operations, is sent their results, returns a T.
Step = Generator[Op, Any, T]


class StepLock(Protocol):
    def release(self) -> None: ...


class StepIO(Protocol):
    """The host operations a step may yield, bound to one image file. The synchronous driver's return
    their results, the async driver's return awaitables of them: a step never sees the difference."""

    def write_zeros(self, offset: int, length: int) -> Any: ...
    def punch_hole(self, offset: int, length: int) -> Any: ...
    def truncate(self, size: int) -> Any: ...
    def fdatasync(self) -> Any: ...
    def call(self, fn: Callable[..., Any], *args: Any) -> Any: ...
    def acquire(self, lock: StepLock) -> Any: ...
    def new_lock(self) -> StepLock: ...
    def close(self) -> Any: ...


def run_sync(step: Step[T]) -> T:
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
        value: T = stop.value
        return value


class _NoLock:
    """Synchronous callers are serialised whole (Disk holds one lock per operation): no inner locks."""

    def release(self) -> None:
        return None


class SyncIO:
    """StepIO that calls the HostIO directly: every operation blocks the calling thread."""

    def __init__(self, host: HostIO) -> None:
        self.host = host
        self.write_zeros = host.write_zeros
        self.punch_hole = host.punch_hole
        self.truncate = host.truncate
        self.fdatasync = host.fdatasync

    @staticmethod
    def call(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    @staticmethod
    def acquire(lock: StepLock) -> None:
        return None

    @staticmethod
    def new_lock() -> StepLock:
        return _NoLock()

    def close(self) -> None:
        self.host.close()
