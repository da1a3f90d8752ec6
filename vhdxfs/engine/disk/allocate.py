"""Allocation: payload blocks and sector bitmap blocks get file space on first write, give it back on unmap.

A lock serialises BAT changes (two writers into one new block must not both allocate it). In a
differencing image a NOT_PRESENT block becomes PARTIALLY_PRESENT: its sector bitmap says which sectors
are here, the rest still come from the parent; a write marks its sectors present only after its data is
in the file. Space freed by an unmap is reused only once the BAT change that freed it is durable
(allocator.py).
"""

from __future__ import annotations

from ...format.bat import BitmapState, PayloadState
from ...format.constants import SECTOR_BITMAP_BLOCK_SIZE
from ..image.bitmaps import SectorBitmaps, all_set
from ..image.block_table import BlockAllocationTable
from .space import Allocator
from .steps import Step, StepIO, StepLock
from .translate import Translator

_PRESENT = PayloadState.FULLY_PRESENT
_PARTIAL = PayloadState.PARTIALLY_PRESENT


class Allocation:
    """Block allocation of one image."""

    def __init__(self, translator: Translator, file_size: int, *, has_parent: bool) -> None:
        self.translator = translator
        self.bat: BlockAllocationTable = translator.bat
        self.bitmaps: SectorBitmaps | None = translator.bitmaps
        self.geometry = translator.geometry
        self.allocator = Allocator(file_size)
        self.has_parent = has_parent
        self.io: StepIO
        self.lock: StepLock

    def attach(self, io: StepIO) -> None:
        self.io = io
        self.lock = io.new_lock()

    def _bitmaps(self) -> SectorBitmaps:
        assert self.bitmaps is not None, "sector bitmaps belong to differencing images"
        return self.bitmaps

    def _new_space(self, length: int) -> Step[int]:
        """File offset of ``length`` fresh bytes (reading as zeros). Call with the lock held."""
        file_offset, extends = self.allocator.allocate(length)
        if extends:
            end = file_offset + length
            yield (self.io.truncate, end)
            self.allocator.grew(end)
        return file_offset

    def allocate(self, block: int) -> Step[tuple[int, int]]:
        """(state, file offset) of ``block`` ready for writing, allocating space if it has none.

        Any block but a NOT_PRESENT one of a differencing image becomes FULLY_PRESENT on fresh space,
        which reads as zeros, as the block did before.
        """
        yield (self.io.acquire, self.lock)
        try:
            state, file_offset = self.bat.payload(block)
            if state == _PARTIAL:
                # The write will mark sectors in its bitmap: load it if no read has yet.
                yield from self.translator.load_bitmap(self.io, block // self.geometry.chunk_ratio)
            if state in (_PRESENT, _PARTIAL):
                return state, file_offset
            new_state = _PARTIAL if self.has_parent and state == PayloadState.NOT_PRESENT else _PRESENT
            if new_state == _PARTIAL:
                chunk = block // self.geometry.chunk_ratio
                yield from self.translator.load_bitmap(self.io, chunk)
                if self.bat.bitmap(chunk)[0] != BitmapState.PRESENT:
                    bitmap_offset = yield from self._new_space(SECTOR_BITMAP_BLOCK_SIZE)
                    self.bat.set_bitmap(chunk, BitmapState.PRESENT, bitmap_offset)
                    self._bitmaps().place(chunk, bitmap_offset)
            file_offset = yield from self._new_space(self.geometry.block_size)
            self.bat.set_payload(block, new_state, file_offset)
            return new_state, file_offset
        finally:
            self.lock.release()

    def mark_present(self, block: int, voff: int, n: int) -> None:
        """Sectors [voff, voff+n) of a PARTIALLY_PRESENT block hold data now; a full block becomes FULLY_PRESENT."""
        lss = self.geometry.logical_sector_size
        bitmaps = self._bitmaps()
        chunk, bit = bitmaps.sector_position(voff // lss)
        bitmaps.mark(chunk, bit, n // lss)
        state, file_offset = self.bat.payload(block)
        if state == _PARTIAL:
            _chunk, first = bitmaps.sector_position(block * self.geometry.sectors_per_block)
            if all_set(bitmaps.blocks[chunk], first, self.geometry.sectors_per_block):
                self.bat.set_payload(block, _PRESENT, file_offset)

    def unmap(self, block: int) -> Step[None]:
        """The whole block reads as zeros (ZERO), and its space goes back to the host."""
        yield (self.io.acquire, self.lock)
        try:
            state, file_offset = self.bat.payload(block)
            self.bat.set_payload(block, PayloadState.ZERO)
            if state in (_PRESENT, _PARTIAL):
                bs = self.geometry.block_size
                yield (self.io.punch_hole, file_offset, bs)
                self.allocator.release(file_offset, bs)
        finally:
            self.lock.release()
