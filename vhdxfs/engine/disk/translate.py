"""Translation: a virtual byte range of one image becomes typed runs (runs.py), read from the BAT and the
sector bitmaps.

Translation never waits: it is plain computation on the in-memory BAT and the sector bitmaps loaded so
far. Where it meets a PARTIALLY_PRESENT block whose chunk's bitmap is not in memory yet it stops and says
which chunk it needs (``NeedBitmap``); the caller loads it (``load_bitmap``, a step: structure I/O) and
asks again. Bitmaps, once loaded, stay for the life of the open, so the second answer is the whole one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from ...format.bat import Geometry, PayloadState
from ...format.constants import SECTOR_BITMAP_BLOCK_SIZE
from ..image.bitmaps import SectorBitmaps, bit_runs
from ..image.block_table import BlockAllocationTable
from .runs import Kind, Run, add_run
from .steps import Step, StepIO

_PRESENT = int(PayloadState.FULLY_PRESENT)
_PARTIAL = int(PayloadState.PARTIALLY_PRESENT)
_NOT_PRESENT = int(PayloadState.NOT_PRESENT)


class NeedBitmap(NamedTuple):
    """Translation stopped: the sector bitmap of ``chunk`` must be loaded first."""

    chunk: int


class Translator:
    """Translation of one image: its BAT, its sector bitmaps (differencing images), whether it has a parent."""

    def __init__(self, bat: BlockAllocationTable, bitmaps: SectorBitmaps | None, has_parent: bool) -> None:
        self.bat = bat
        self.geometry = bat.geometry
        self.bitmaps = bitmaps
        self.has_parent = has_parent

    def translate(self, offset: int, length: int, runs: list[Run], *, depth: int = 0,
                  used: list[int] | None = None) -> NeedBitmap | None:
        """Append the runs covering [offset, offset+length) to ``runs`` (coalesced, of layer ``depth``) and the
        file offset of every block they read from to ``used``; or stop at the first bitmap not loaded."""
        bs = self.geometry.block_size
        zero_kind = Kind.PARENT if self.has_parent else Kind.HOLE
        pos, end = offset, offset + length
        while pos < end:
            block, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            state, file_offset = self.bat.payload(block)
            if state == _NOT_PRESENT and end - pos > n:  # a stretch of them, skipped a page at a time
                n = min(self.bat.next_block_held(block) * bs, end) - pos
            if state == _PRESENT:
                add_run(runs, pos, n, Kind.DATA, file_offset + within, depth)
            elif state == _PARTIAL:
                pieces = self.sector_runs(pos, n)
                if isinstance(pieces, NeedBitmap):
                    return pieces
                for voff, m, present in pieces:
                    if present:
                        add_run(runs, voff, m, Kind.DATA, file_offset + voff - block * bs, depth)
                    else:
                        add_run(runs, voff, m, Kind.PARENT, -1, depth)
            elif state == _NOT_PRESENT:
                add_run(runs, pos, n, zero_kind, -1, depth)
            else:
                add_run(runs, pos, n, Kind.ZERO, -1, depth)
            if used is not None and state in (_PRESENT, _PARTIAL):
                used.append(file_offset)
            pos += n
        return None

    def sector_runs(self, offset: int, n: int) -> list[tuple[int, int, bool]] | NeedBitmap:
        """(virtual offset, length, present here) for [offset, offset+n) inside one PARTIALLY_PRESENT block."""
        bitmaps = self.bitmaps
        assert bitmaps is not None, "a PARTIALLY_PRESENT block in an image without sector bitmaps"
        lss = self.geometry.logical_sector_size
        first_sector, last_sector = offset // lss, (offset + n - 1) // lss
        chunk, bit = bitmaps.sector_position(first_sector)
        bits = bitmaps.blocks.get(chunk)
        if bits is None:
            return NeedBitmap(chunk)
        out = []
        for start, count, present in bit_runs(bits, bit, last_sector - first_sector + 1):
            lo = max(offset, (first_sector + start - bit) * lss)
            hi = min(offset + n, (first_sector + start - bit + count) * lss)
            out.append((lo, hi - lo, present))
        return out

    def loaded(self, chunk: int) -> bool:
        return self.bitmaps is None or chunk in self.bitmaps.blocks

    def load_bitmap(self, io: StepIO, chunk: int) -> Step[bytearray]:
        """Load the sector bitmap of ``chunk`` (structure I/O, through ``io.call``); its bits."""
        bitmaps = self.bitmaps
        assert bitmaps is not None
        bits = bitmaps.blocks.get(chunk)
        if bits is None:
            state, file_offset = self.bat.bitmap(chunk)
            bits = yield (io.call, bitmaps.load, chunk, state, file_offset)
        return bits

    def translate_loading(self, io: StepIO, offset: int, length: int) -> Step[list[Run]]:
        """The runs of [offset, offset+length), loading the bitmaps they need first (for offline use)."""
        while True:
            runs: list[Run] = []
            need = self.translate(offset, length, runs)
            if need is None:
                return runs
            yield from self.load_bitmap(io, need.chunk)


def new_bitmaps(geometry: Geometry, read_meta: Callable[[int, int], bytes]) -> SectorBitmaps:
    """Sector bitmaps of a differencing image, read through ``read_meta`` (which applies a replayed log)."""
    return SectorBitmaps(geometry, lambda off: read_meta(off, SECTOR_BITMAP_BLOCK_SIZE))
