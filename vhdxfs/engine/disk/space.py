"""File space for new payload and sector bitmap blocks: 1 MiB aligned, at the end of the file or reused.

Space freed by a discard is reused only after the BAT change that freed it is durable: a flush takes the
pending ranges together with its dirty pages (``take_pending``) and frees exactly those once its commit is
durable (``reuse``). Before that, a crash could leave the old BAT entry pointing at space that now holds
another block's data, and reads would leak it (spec note <11>); and a range freed while the flush commits
is not in its pages, so it waits for the next flush.
"""

from __future__ import annotations

from ...format.constants import MiB


class Allocator:
    def __init__(self, file_end: int) -> None:
        self.file_end = -(-file_end // MiB) * MiB
        # How far the file has really grown: ``file_end`` counts space handed out whose growth (a truncate)
        # may still be under way, and a log entry must never claim a file longer than it is.
        self.grown = file_end  # the real length: not rounded (a log entry would claim more than there is)
        self.free: dict[int, list[int]] = {}  # length -> offsets whose holes were punched
        self.pending: list[tuple[int, int]] = []  # (offset, length) freed by changes not yet committed

    def allocate(self, length: int) -> tuple[int, bool]:
        """(file offset, extends_file) for a new block of ``length`` bytes (a multiple of 1 MiB)."""
        reusable = self.free.get(length)
        if reusable:
            return reusable.pop(), False
        offset = self.file_end
        self.file_end += length
        return offset, True

    def grew(self, size: int) -> None:
        """The file is now at least ``size`` bytes long."""
        self.grown = max(self.grown, size)

    def release(self, offset: int, length: int) -> None:
        """The block at ``offset`` is no longer referenced by the in-memory BAT (its hole is punched)."""
        self.pending.append((offset, length))

    def take_pending(self) -> list[tuple[int, int]]:
        """The ranges freed so far, handed to a flush (which gives them back with ``keep_pending`` if it fails
        or cannot free them yet)."""
        pending, self.pending = self.pending, []
        return pending

    def keep_pending(self, ranges: list[tuple[int, int]]) -> None:
        self.pending[:0] = ranges

    def reuse(self, ranges: list[tuple[int, int]]) -> None:
        """The BAT changes that freed ``ranges`` are durable and nothing in flight still uses them."""
        for offset, length in ranges:
            self.free.setdefault(length, []).append(offset)
