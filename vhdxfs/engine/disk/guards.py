"""I/O guards: a request holds the file space of exactly the blocks it moves bytes to or from.

Why: space freed by a discard is reused for another block once the discard is durable (space.py). A
read or write that found a block at its old place must not move its bytes there after that, or a read
would return another block's data and a write would destroy it. So the core hands every read and write a
*plan*: the typed runs (runs.py) to move, and a guard on the blocks they lie in. A flush reuses a freed
range only when no guard holds it (flush.py); held ranges wait for the next flush. Nothing else waits:
requests on other blocks, however many blocks they span, allocate or read through a parent, never keep
freed space from reuse. A request that moves its bytes before it yields needs no guard: nothing can run in
between. For the most common of those (one block, read from the page cache or queued for writing) the core
gives only the file offset (``DiskCore.locate``, ``locate_write``), the request path's shortcut.

The count is per block of each layer (``BlockGuards``), so a guard costs a dict update per block. A later
switch of layers under running I/O waits on the same counts (``idle``).

When a guard completes:
- a read plan is complete once its bytes are in the caller's buffer (``ReadPlan.complete`` also patches
  in a log replayed in memory, for a read-only open of an image with a dirty log);
- a write plan is complete once its payload is in the file *or queued for it*: the async driver's
  write-back queue applies writes, hole punches and zeroing in the order they were queued (aio/writeback.py),
  so a queued write always lands before the punch of its block and before any reuse of the space, and
  its guard may end when it is queued. ``WritePlan.complete`` marks the written sectors present in the
  sector bitmap: only now may a reader be sent to them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..image.journal import Overlay
from .runs import Run


class BlockGuards:
    """Per-block counts of the requests moving bytes in one layer's file, keyed by the block's file offset."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}  # a block is in it only while some request holds it

    def hold(self, block_offset: int) -> None:
        counts = self.counts
        counts[block_offset] = counts.get(block_offset, 0) + 1

    def let_go(self, block_offset: int) -> None:
        counts = self.counts
        n = counts[block_offset]
        if n == 1:
            del counts[block_offset]
        else:
            counts[block_offset] = n - 1

    def holds(self, block_offset: int) -> bool:
        """Is the block at ``block_offset`` of the file held by a request?"""
        return block_offset in self.counts

    @property
    def idle(self) -> bool:
        """No request moves bytes in this layer's file."""
        return not self.counts


Held = list[tuple[BlockGuards, int]]


class ReadPlan:
    """What a read moves: runs of DATA (layer ``depth``, ``file_offset``), ZERO and HOLE, in order, covering
    the request; and the blocks held until ``complete`` or ``release``."""

    __slots__ = ("offset", "runs", "_held", "_patches")

    def __init__(self, offset: int, runs: Sequence[Run], held: Held,
                 patches: list[tuple[Overlay, Run]] | None = None) -> None:
        self.offset = offset
        self.runs = runs
        self._held = held
        self._patches = patches

    def complete(self, buf: bytearray) -> None:
        """The bytes are in ``buf`` (the request's buffer): apply a replayed log, let the blocks go."""
        if self._patches:
            view = memoryview(buf)
            for overlay, run in self._patches:
                start = run.offset - self.offset
                part = bytearray(view[start:start + run.length])
                overlay.patch(run.file_offset, part)
                view[start:start + run.length] = part
        held, self._held = self._held, []
        for guards, block_offset in held:  # as release(), written out: on every read's path
            counts = guards.counts
            n = counts[block_offset]
            if n == 1:
                del counts[block_offset]
            else:
                counts[block_offset] = n - 1

    def release(self) -> None:
        """Let the blocks go (also when moving the bytes failed). Once only."""
        held, self._held = self._held, []
        for guards, block_offset in held:
            guards.let_go(block_offset)


class WritePlan:
    """What a write moves: DATA runs of the image itself (coalesced where contiguous in the file), covering
    the request; the blocks held; the sectors to mark present on ``complete``."""

    __slots__ = ("offset", "runs", "_guards", "_held", "_marks")

    def __init__(self, offset: int, runs: Sequence[Run], guards: BlockGuards, held: list[int],
                 marks: list[Callable[[], None]] | None = None) -> None:
        self.offset = offset
        self.runs = runs
        self._guards = guards
        self._held = held
        self._marks = marks

    def complete(self) -> None:
        """The payload is in the file or queued for it: the sectors it wrote are present now."""
        if self._marks:
            for mark in self._marks:
                mark()
            self._marks = None
        held, self._held = self._held, []
        counts = self._guards.counts
        for block_offset in held:  # as release(), written out: on every write's path
            n = counts[block_offset]
            if n == 1:
                del counts[block_offset]
            else:
                counts[block_offset] = n - 1

    def release(self) -> None:
        """Let the blocks go without marking anything (also when moving the bytes failed). Once only."""
        held, self._held = self._held, []
        guards = self._guards
        for block_offset in held:
            guards.let_go(block_offset)
