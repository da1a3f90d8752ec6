"""SpaceMap: what occupies each byte range of an image file, and what is wrong with it.

An image file holds fixed structures (the 1 MiB header section, the log, the regions: metadata and BAT)
and blocks the BAT points at (payload blocks, sector bitmap blocks). Opening, checking and repairing an
image ask the same question of this layout (does any block lie outside the file, inside a structure, or
over another block?), and compacting and resizing ask where the free runs and the end are. This module
answers all of them from one sorted list of spans.
"""

from __future__ import annotations

from typing import NamedTuple

from ...format.constants import HEADER_SECTION_SIZE, MiB


class Span(NamedTuple):
    """``length`` bytes at ``offset``: a structure (entry None, with its name) or the block of BAT entry ``entry``.

    A tuple, not a dataclass: a large image has millions of blocks, and each open maps them all."""

    offset: int
    length: int
    entry: int | None = None
    name: str = ""

    @property
    def end(self) -> int:
        return self.offset + self.length


def _place(span: Span) -> tuple[int, int]:
    return span.offset, span.length


class SpaceMap:
    """Structures and blocks of one file of ``file_size`` bytes."""

    def __init__(self, file_size: int, structures: list[Span], blocks: list[Span]) -> None:
        self.file_size = file_size
        self.structures = sorted(structures, key=_place)
        self.blocks = sorted(blocks, key=_place)

    def problems(self) -> dict[int, str]:
        """BAT index -> why its block is misplaced: outside the file (or in the header section), inside a
        structure, or overlapping another block (both blocks of an overlap are named, in file order)."""
        bad: dict[int, str] = {}
        owner_end, owner = HEADER_SECTION_SIZE, None
        for span in self.blocks:
            assert span.entry is not None, "blocks are BAT entries"
            if span.offset < HEADER_SECTION_SIZE or span.end > self.file_size:
                bad[span.entry] = f"pointed at {span.offset}+{span.length}, outside the file ({self.file_size} bytes)"
                continue
            hit = next((s.name for s in self.structures if span.offset < s.end and s.offset < span.end), None)
            if hit is not None:
                bad[span.entry] = f"pointed at {span.offset}, inside the {hit}"
                continue
            if owner is not None and span.offset < owner_end:
                bad[span.entry] = f"pointed at {span.offset}, overlapping the block of BAT entry {owner}"
                bad.setdefault(owner, f"overlapped the block of BAT entry {span.entry}")
            if span.end > owner_end or owner is None:
                owner_end, owner = span.end, span.entry
        return bad

    def items(self) -> list[Span]:
        """Structures and blocks together, in file order."""
        return sorted(self.structures + self.blocks, key=_place)

    def gaps(self) -> list[tuple[int, int]]:
        """[start, end) of every free run between the header section and the last item."""
        out, at = [], HEADER_SECTION_SIZE
        for span in self.items():
            if span.offset > at:
                out.append((at, span.offset))
            at = max(at, span.end)
        return out

    def end(self) -> int:
        """Where the last structure or block ends (at least the header section's end)."""
        return max([HEADER_SECTION_SIZE, *(s.end for s in self.structures), *(s.end for s in self.blocks)])

    def plan_moves(self) -> tuple[list[tuple[int, int, int, int]], int]:
        """([(BAT index, old offset, new offset, length)], new end): blocks at the tail into the lowest gaps
        (first fit) until a structure or a block that fits nowhere lower ends the tail; the new end is
        rounded up to 1 MiB."""
        gaps = [list(g) for g in self.gaps()]
        remaining = self.items()
        moves = []
        while remaining:
            span = remaining[-1]
            if span.entry is None:
                break  # a structure that cannot move: nothing after it is left
            # First fit: every lower gap is too small for this block, so a moved block never moves twice.
            gap = next((g for g in gaps if g[1] - g[0] >= span.length and g[0] + span.length <= span.offset), None)
            if gap is None:
                break
            moves.append((span.entry, span.offset, gap[0], span.length))
            remaining.pop()
            moved = Span(gap[0], span.length, span.entry, span.name)
            remaining.append(moved)
            remaining.sort(key=_place)
            gap[0] += span.length
        end = max((s.end for s in remaining), default=HEADER_SECTION_SIZE)
        return moves, -(-end // MiB) * MiB
