"""BAT entries and the geometry that maps payload blocks and sector bitmaps to BAT indexes (2.4, 2.5)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from .constants import SECTORS_PER_BITMAP, MiB

STATE_MASK = 0x7
OFFSET_SHIFT = 20
RESERVED_MASK = ((1 << OFFSET_SHIFT) - 1) & ~STATE_MASK


class PayloadState(IntEnum):
    NOT_PRESENT = 0
    UNDEFINED = 1
    ZERO = 2
    UNMAPPED = 3
    FULLY_PRESENT = 6
    PARTIALLY_PRESENT = 7


class BitmapState(IntEnum):
    NOT_PRESENT = 0
    PRESENT = 6


def make_entry(state: int, file_offset: int) -> int:
    """A BAT entry: state in bits 0-2, file offset in MiB in bits 20-63."""
    return (file_offset // MiB) << OFFSET_SHIFT | state


def entry_state(entry: int) -> int:
    return entry & STATE_MASK


def entry_offset(entry: int) -> int:
    """File offset in bytes."""
    return (entry >> OFFSET_SHIFT) * MiB


@dataclass(frozen=True)
class Geometry:
    """The numbers derived from block size, logical sector size and virtual size (docs/design.md, 2.4-2.5)."""

    virtual_size: int
    block_size: int
    logical_sector_size: int
    has_parent: bool = False

    @property
    def chunk_ratio(self) -> int:
        """Payload blocks per sector bitmap block."""
        return SECTORS_PER_BITMAP * self.logical_sector_size // self.block_size

    @property
    def chunk_size(self) -> int:
        """Virtual bytes described by one sector bitmap block."""
        return SECTORS_PER_BITMAP * self.logical_sector_size

    @property
    def data_blocks(self) -> int:
        return -(-self.virtual_size // self.block_size)

    @property
    def bitmap_blocks(self) -> int:
        return -(-self.data_blocks // self.chunk_ratio)

    @property
    def total_entries(self) -> int:
        if self.has_parent:
            return self.bitmap_blocks * (self.chunk_ratio + 1)
        return self.data_blocks + (self.data_blocks - 1) // self.chunk_ratio

    @property
    def bat_bytes(self) -> int:
        """Bytes the BAT needs, before rounding the region up to 1 MiB."""
        return self.total_entries * 8

    @property
    def bat_region_length(self) -> int:
        return -(-self.bat_bytes // MiB) * MiB

    def payload_index(self, block: int) -> int:
        """BAT index of payload block ``block``."""
        return block + block // self.chunk_ratio

    def bitmap_index(self, chunk: int) -> int:
        """BAT index of the sector bitmap block of chunk ``chunk``."""
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio

    def is_bitmap_index(self, index: int) -> bool:
        return index % (self.chunk_ratio + 1) == self.chunk_ratio

    def block_of_index(self, index: int) -> int:
        """Payload block number of a payload BAT index (inverse of payload_index)."""
        return index - index // (self.chunk_ratio + 1)

    @property
    def sectors_per_block(self) -> int:
        return self.block_size // self.logical_sector_size
