"""Sector bitmaps of a differencing image (2.4): which sectors of a PARTIALLY_PRESENT block are here.

Bitmap blocks (1 MiB, one per chunk) are loaded on first use and kept in memory; a change marks its
4 KiB page dirty so the engine journals it with the BAT in the next commit.
"""

from __future__ import annotations

from collections.abc import Callable

from ...format.bat import BitmapState, Geometry
from ...format.constants import LOG_SECTOR_SIZE, SECTOR_BITMAP_BLOCK_SIZE
from .dirty import DirtySet

_FULL = 0xFF


def bit_runs(bits: bytes | bytearray, first: int, count: int) -> list[tuple[int, int, bool]]:
    """Runs (first bit, count, is_set) over bits [first, first+count), LSB-first within each byte.

    Whole bytes of 0x00 or 0xFF are taken eight bits at a time, so large reads cost little.
    """
    runs: list[tuple[int, int, bool]] = []
    i, end = first, first + count
    while i < end:
        byte = bits[i >> 3]
        if i & 7 == 0 and end - i >= 8 and byte in (0, _FULL):
            value, step = byte == _FULL, 8
        else:
            value, step = bool(byte >> (i & 7) & 1), 1
        if runs and runs[-1][2] == value:
            runs[-1] = (runs[-1][0], runs[-1][1] + step, value)
        else:
            runs.append((i, step, value))
        i += step
    return runs


def set_bits(bits: bytearray, first: int, count: int) -> None:
    i, end = first, first + count
    while i < end and i & 7:
        bits[i >> 3] |= 1 << (i & 7)
        i += 1
    full_end = end & ~7
    if i < full_end:
        bits[i >> 3:full_end >> 3] = b"\xff" * ((full_end - i) >> 3)
        i = full_end
    while i < end:
        bits[i >> 3] |= 1 << (i & 7)
        i += 1


def all_set(bits: bytes | bytearray, first: int, count: int) -> bool:
    """Are bits [first, first+count) all set? (first and count are multiples of 8 for whole blocks)"""
    if first & 7 == 0 and count & 7 == 0:
        return bits[first >> 3:(first + count) >> 3] == b"\xff" * (count >> 3)
    return all(r[2] for r in bit_runs(bits, first, count))


class SectorBitmaps:
    """In-memory sector bitmap blocks of one differencing image, keyed by chunk."""

    def __init__(self, geometry: Geometry, read_block: Callable[[int], bytes]) -> None:
        self.geometry = geometry
        self._read_block = read_block  # (file offset) -> 1 MiB of bytes
        self.blocks: dict[int, bytearray] = {}
        self.offsets: dict[int, int] = {}
        self.dirty: DirtySet[tuple[int, int]] = DirtySet()  # (chunk, page)

    def load(self, chunk: int, state: int, file_offset: int) -> bytearray:
        """The chunk's bitmap, read on first use. Loads may run at once (in worker threads, for a read and a
        write of the same chunk): the first one stored wins, so marks made in it meanwhile are never lost."""
        bits = self.blocks.get(chunk)
        if bits is None:
            if state == BitmapState.PRESENT:
                loaded = bytearray(self._read_block(file_offset))
                self.offsets.setdefault(chunk, file_offset)
            else:
                loaded = bytearray(SECTOR_BITMAP_BLOCK_SIZE)
            bits = self.blocks.setdefault(chunk, loaded)
        return bits

    def place(self, chunk: int, file_offset: int) -> None:
        """The chunk's bitmap now lives at ``file_offset`` (newly allocated)."""
        self.offsets[chunk] = file_offset
        bits = self.blocks.setdefault(chunk, bytearray(SECTOR_BITMAP_BLOCK_SIZE))
        for page in range(SECTOR_BITMAP_BLOCK_SIZE // LOG_SECTOR_SIZE):
            if any(bits[page * LOG_SECTOR_SIZE:(page + 1) * LOG_SECTOR_SIZE]):
                self.dirty.add((chunk, page))

    def sector_position(self, sector: int) -> tuple[int, int]:
        """(chunk, bit index within the chunk's bitmap) of virtual sector ``sector``."""
        per_chunk = self.geometry.chunk_size // self.geometry.logical_sector_size
        return divmod(sector, per_chunk)

    def mark(self, chunk: int, first_bit: int, count: int) -> None:
        set_bits(self.blocks[chunk], first_bit, count)
        if chunk in self.offsets:
            for page in range(first_bit // (8 * LOG_SECTOR_SIZE), (first_bit + count - 1) // (8 * LOG_SECTOR_SIZE) + 1):
                self.dirty.add((chunk, page))

    def pages_for(self, keys: set[tuple[int, int]]) -> dict[int, bytes]:
        """File offset -> contents of the given (chunk, page) pages."""
        pages = {}
        for chunk, page in sorted(keys):
            if chunk in self.offsets:
                start = page * LOG_SECTOR_SIZE
                pages[self.offsets[chunk] + start] = bytes(self.blocks[chunk][start:start + LOG_SECTOR_SIZE])
        return pages
