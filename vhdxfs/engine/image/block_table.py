"""The block allocation table in memory: one machine word per entry (array('Q')), dirty 4 KiB pages.

A 64 TiB image with 64 MiB blocks has about a million entries: 8 MiB here, where Python objects per
entry would cost ten times that. Changes mark their 4 KiB page dirty; the engine journals dirty pages.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator

from ...format.bat import (
    OFFSET_SHIFT,
    RESERVED_MASK,
    BitmapState,
    Geometry,
    PayloadState,
    entry_offset,
    entry_state,
    make_entry,
)
from ...format.constants import LOG_SECTOR_SIZE, MiB
from .dirty import DirtySet
from .spacemap import Span

ENTRIES_PER_PAGE = LOG_SECTOR_SIZE // 8
_ZERO_SCAN = 1 << 16  # entries per scan chunk
_BARE = {0, 1, 2, 3}  # payload states without file space: NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED

PAYLOAD_STATES = {s.value for s in PayloadState}
BITMAP_STATES = {s.value for s in BitmapState}


class BlockAllocationTable:
    def __init__(self, geometry: Geometry, raw: bytes, region_offset: int) -> None:
        self.geometry = geometry
        self._chunk_ratio = geometry.chunk_ratio
        self.region_offset = region_offset
        count = geometry.total_entries
        self.entries = array("Q")
        self.entries.frombytes(raw[:count * 8])
        if sys.byteorder != "little":
            self.entries.byteswap()
        self.dirty: DirtySet[int] = DirtySet()  # page numbers

    # -- lookups ------------------------------------------------------------------------------------------
    def payload(self, block: int) -> tuple[int, int]:
        """(state, file offset) of payload block ``block``.

        On every request's path: Geometry.payload_index and entry_offset written out, to save two calls.
        """
        e = self.entries[block + block // self._chunk_ratio]
        return e & 7, (e >> OFFSET_SHIFT) << OFFSET_SHIFT  # == entry_offset(e)

    def bitmap(self, chunk: int) -> tuple[int, int]:
        e = self.entries[self.geometry.bitmap_index(chunk)]
        return e & 7, entry_offset(e)

    # -- changes ------------------------------------------------------------------------------------------
    def _set(self, index: int, value: int) -> None:
        if self.entries[index] != value:
            self.entries[index] = value
            self.dirty.add(index // ENTRIES_PER_PAGE)

    def set_payload(self, block: int, state: int, file_offset: int = 0) -> None:
        self._set(self.geometry.payload_index(block), make_entry(state, file_offset))

    def set_bitmap(self, chunk: int, state: int, file_offset: int = 0) -> None:
        self._set(self.geometry.bitmap_index(chunk), make_entry(state, file_offset))

    def page_bytes(self, page: int) -> bytes:
        """The 4 KiB page ``page`` as it belongs on disk (entries past the table read as zeros)."""
        chunk = self.entries[page * ENTRIES_PER_PAGE:(page + 1) * ENTRIES_PER_PAGE]
        if sys.byteorder != "little":
            chunk.byteswap()
        data = chunk.tobytes()
        return data + bytes(LOG_SECTOR_SIZE - len(data))

    def pages_for(self, pages: set[int]) -> dict[int, bytes]:
        """File offset -> contents of the given pages."""
        return {self.region_offset + p * LOG_SECTOR_SIZE: self.page_bytes(p) for p in sorted(pages)}

    def take_dirty_pages(self) -> dict[int, bytes]:
        """Snapshot and clear the dirty pages: file offset -> page contents."""
        return self.pages_for(self.dirty.take())

    # -- iteration and validation -------------------------------------------------------------------------
    def notable(self) -> Iterator[tuple[int, int]]:
        """(index, entry) for every entry that holds file space or could be invalid.

        Bare payload states 0-3 with no offset (what most of a large sparse BAT holds, zero or not: QEMU
        marks unallocated blocks ZERO) are skipped a whole chunk at a time at C speed; bitmap entries are
        always yielded when non-zero, since a bare value there is invalid.
        """
        entries = self.entries
        step = self.geometry.chunk_ratio + 1
        for base in range(0, len(entries), _ZERO_SCAN):
            chunk = entries[base:base + _ZERO_SCAN]
            if set(chunk) <= _BARE:
                first = base + (self.geometry.chunk_ratio - base) % step  # first bitmap index >= base
                for index in range(first, base + len(chunk), step):
                    if entries[index]:
                        yield index, entries[index]
                continue
            for i, e in enumerate(chunk):
                if e > 3 or (e and self.geometry.is_bitmap_index(base + i)):
                    yield base + i, e

    def allocated_ranges(self) -> list[tuple[int, int, int]]:
        """(file offset, length, BAT index) of every block that occupies file space, sorted."""
        g = self.geometry
        out = []
        for index, e in self.notable():
            state = entry_state(e)
            if g.is_bitmap_index(index):
                if state == BitmapState.PRESENT:
                    out.append((entry_offset(e), MiB, index))
            elif state in (PayloadState.FULLY_PRESENT, PayloadState.PARTIALLY_PRESENT):
                out.append((entry_offset(e), g.block_size, index))
        out.sort()
        return out

    def spans(self, exclude: dict[int, str] | None = None) -> list[Span]:
        """The blocks that occupy file space, as SpaceMap spans (entries in ``exclude`` left out)."""
        return [Span(offset, length, index) for offset, length, index in self.allocated_ranges()
                if not exclude or index not in exclude]

    def entry_problems(self, disk_type: str) -> dict[int, str]:
        """BAT index -> why the entry itself is invalid: an unknown state, reserved bits set, or a state
        only a differencing image may use."""
        g = self.geometry
        bad: dict[int, str] = {}
        for index, e in self.notable():
            state, is_bitmap = entry_state(e), g.is_bitmap_index(index)
            if state not in (BITMAP_STATES if is_bitmap else PAYLOAD_STATES) or e & RESERVED_MASK:
                bad[index] = f"had an invalid state or reserved bits (0x{e:016x})"
            elif not g.has_parent and ((is_bitmap and state == BitmapState.PRESENT)
                                       or state == PayloadState.PARTIALLY_PRESENT and not is_bitmap):
                bad[index] = f"had a differencing-only state in a {disk_type} image (0x{e:016x})"
        return bad
