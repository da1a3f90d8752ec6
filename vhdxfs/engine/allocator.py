"""File space for new payload and sector bitmap blocks: 1 MiB aligned, at the end of the file or reused.

Space freed by a discard is reused only after the BAT change that freed it is durable (the engine calls
``release_pending`` after each commit): before that, a crash could leave the old BAT entry pointing at
space that now holds another block's data, and reads would leak it (spec note <11>).
"""

from __future__ import annotations

from ..format.constants import MiB


class Allocator:
    def __init__(self, file_end: int) -> None:
        self.file_end = -(-file_end // MiB) * MiB
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

    def release(self, offset: int, length: int) -> None:
        """The block at ``offset`` is no longer referenced by the in-memory BAT (its hole is punched)."""
        self.pending.append((offset, length))

    def release_pending(self) -> None:
        """The BAT changes that freed the pending ranges are durable: they may now be reused."""
        for offset, length in self.pending:
            self.free.setdefault(length, []).append(offset)
        self.pending.clear()
