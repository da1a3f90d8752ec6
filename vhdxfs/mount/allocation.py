"""st_blocks of a raw file: the bytes of its disk that hold data, counted so that every answer is true.

cp and tar look for holes only when st_blocks says a file is sparse, so an answer of "all of it" makes cp
copy every byte of the disk. The kernel keeps whichever answer about a file came first (a lookup's, a
getattr's, a setattr's or a readdirplus entry's) for the attr_timeout given with it. So the count is made
at the first question, never guessed; made again once the disk changed, at most every ALLOCATION_RECOUNT
seconds (counting walks the BAT of the whole chain); and a count that writes have made stale goes out with
a timeout that ends when the next count is due, not in an hour.
"""

from __future__ import annotations

import time

import trio

from ..engine import Kind
from ..engine.aio import AsyncDisk

ALLOCATION_RECOUNT = 5.0  # seconds
COUNT_STEP = 0.002  # seconds: how long one piece of a count may keep the loop (and the GIL)
COUNT_FIRST_PIECE = 8 << 20
COUNT_MIN_PIECE = 1 << 20
ATTR_TIMEOUT = 3600.0  # seconds: how long the kernel keeps names and attributes that nothing has changed


class Allocation:
    """The bytes of one disk (through its chain) that hold data, as st_blocks and its timeout need them."""

    def __init__(self, disk: AsyncDisk) -> None:
        self.disk = disk
        self.counted: int | None = None
        self.counted_at = 0.0
        self.counted_changes: tuple[int, ...] | None = None  # the disk's changes when it was counted

    def _changes(self) -> tuple[int, ...] | None:
        """What moves whenever the allocation may have: the disk's write and zero requests, done or failed
        (engine/aio/stats.py), and its chain. None for a disk that counts nothing (a test's stand-in)."""
        stats = getattr(self.disk, "stats", None)
        if stats is None:
            return None
        return (stats.write.requests, stats.write.failures, stats.zero.requests, stats.zero.failures,
                id(self.disk.core))

    def is_current(self) -> bool:
        """Nothing changed on the disk since the count."""
        changes = self._changes()
        return self.counted is not None and changes is not None and changes == self.counted_changes

    async def count(self) -> int:
        """The bytes that hold data: counted at the first call, then again only once the disk changed, at
        most every ALLOCATION_RECOUNT seconds."""
        now = time.monotonic()
        if self.counted is None or (not self.is_current() and now - self.counted_at > ALLOCATION_RECOUNT):
            changes = self._changes()  # before counting: a write that ends meanwhile makes the count stale
            self.counted = await self._data_bytes()
            self.counted_at, self.counted_changes = now, changes
        return self.counted

    async def _data_bytes(self) -> int:
        """Counted a piece at a time, the loop free between pieces: a whole-disk count of a child with many
        sector runs takes hundreds of milliseconds, which the disk's requests would wait out (a `stat` of
        the raw file held a QD1 writer for 450 ms). Resting as long as each piece took leaves the GIL to the
        write-back threads too (without the rest, a count in pieces still starved them: the queue filled and
        a writer waited 440 ms). A piece grows while it counts fast (a large sparse disk takes few pieces)
        and shrinks once one takes longer than COUNT_STEP."""
        size, pos, piece, total = self.disk.size, 0, COUNT_FIRST_PIECE, 0
        while pos < size:
            n = min(piece, size - pos)
            started = time.perf_counter()
            total += sum(e.length for e in await self.disk.extents(pos, n) if e.kind == Kind.DATA)
            pos += n
            took = time.perf_counter() - started
            if took < COUNT_STEP / 4:
                piece *= 2
            elif took > COUNT_STEP:
                piece = max(COUNT_MIN_PIECE, piece // 2)
            await trio.sleep(took)  # as long again for the rest: the write-back threads need the GIL too
        return total

    def attr_timeout(self) -> float:
        """How long the kernel may keep the count: ATTR_TIMEOUT while it is current (a write through the
        mount makes the kernel forget it anyway), else until the next count is due."""
        if self.is_current():
            return ATTR_TIMEOUT
        return max(0.0, ALLOCATION_RECOUNT - (time.monotonic() - self.counted_at))
