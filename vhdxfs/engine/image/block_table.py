"""The block allocation table in memory: 4 KiB pages of machine words (array('Q')), present only where the
table holds anything; dirty pages for the log.

Why pages: a 64 TiB differencing image with 2 MiB blocks (Hyper-V's and our default for children) has 32
million entries, 256 MiB as one array, and a chain of twenty such layers would not fit in memory nor open
in a second. Most of such a table is zeros (NOT_PRESENT: the parent answers), which the file usually does
not even store (a hole); so only pages with an entry other than zero are kept, each 512 entries in one
array, and a missing page reads as zeros. A fully allocated 64 TiB image with 64 MiB blocks keeps all its
2,048 pages: 8 MiB, as one array would.

Changes mark their page dirty; the engine journals dirty pages (a page written to zeros stays, as zeros).
"""

from __future__ import annotations

import bisect
import sys
from array import array
from collections.abc import Callable, Iterator

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
from .host import HostIO
from .journal import Overlay
from .spacemap import Span

ENTRIES_PER_PAGE = LOG_SECTOR_SIZE // 8
_PAGE_SHIFT = 9  # ENTRIES_PER_PAGE == 1 << _PAGE_SHIFT
_IN_PAGE = ENTRIES_PER_PAGE - 1
_ZERO_PAGE = bytes(LOG_SECTOR_SIZE)
_BARE = {0, 1, 2, 3}  # payload states without file space: NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED

PAYLOAD_STATES = {s.value for s in PayloadState}
BITMAP_STATES = {s.value for s in BitmapState}


def _page(raw: bytes | bytearray | memoryview) -> array[int]:
    page = array("Q", raw)
    if sys.byteorder != "little":
        page.byteswap()
    return page


_READ_PAGES = 2048  # a BAT is read 8 MiB at a time


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) ranges sorted, overlapping and touching ones joined."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def stored_pages(host: HostIO, overlay: Overlay | None, read: Callable[[int, int], bytes], offset: int,
                 length: int) -> dict[int, bytes]:
    """The 4 KiB pages of [offset, offset+length) that hold anything, read through ``read`` (which applies
    a replayed log): only the ranges the host file stores are read (a large sparse table is mostly a hole)
    and those the replayed log writes; then pages of zeros are dropped."""
    ranges = host.data_ranges(offset, length)
    if overlay:
        ranges += overlay.ranges(offset, length)
    pages: dict[int, bytes] = {}
    for start, end in merged(ranges):
        first, last = (start - offset) // LOG_SECTOR_SIZE, -(-(end - offset) // LOG_SECTOR_SIZE)
        for at in range(first, last, _READ_PAGES):
            n = min(_READ_PAGES, last - at)
            raw = read(offset + at * LOG_SECTOR_SIZE, n * LOG_SECTOR_SIZE)
            for i in range(n):
                page = raw[i * LOG_SECTOR_SIZE:(i + 1) * LOG_SECTOR_SIZE]
                if page != _ZERO_PAGE:
                    pages[at + i] = page
    return pages


class BlockAllocationTable:
    """The BAT of one image: ``pages[n]`` holds entries [512n, 512n + 512), or None for all zeros."""

    def __init__(self, geometry: Geometry, pages: dict[int, bytes], region_offset: int) -> None:
        """``pages``: page number -> 4 KiB as the file holds them (pages not given are zeros)."""
        self.geometry = geometry
        self._chunk_ratio = geometry.chunk_ratio
        self.region_offset = region_offset
        self.total_entries = count = geometry.total_entries
        self.pages: list[array[int] | None] = [None] * -(-count // ENTRIES_PER_PAGE)
        self._present: list[int] = []  # the numbers of the pages there, sorted (next_block_held)
        for number, raw in sorted(pages.items()):
            if number < len(self.pages) and raw != _ZERO_PAGE:
                page = _page(raw)
                last = count - number * ENTRIES_PER_PAGE
                if last < ENTRIES_PER_PAGE:  # past the table: not entries (the spec leaves them unused)
                    page[last:] = array("Q", bytes(8 * (ENTRIES_PER_PAGE - last)))
                self.pages[number] = page
                self._present.append(number)
        self.dirty: DirtySet[int] = DirtySet()  # page numbers

    @classmethod
    def from_bytes(cls, geometry: Geometry, raw: bytes, region_offset: int) -> BlockAllocationTable:
        """From the whole table as bytes (tests, tools that build one)."""
        return cls(geometry, {n: raw[n * LOG_SECTOR_SIZE:(n + 1) * LOG_SECTOR_SIZE].ljust(LOG_SECTOR_SIZE, b"\0")
                              for n in range(-(-len(raw) // LOG_SECTOR_SIZE))}, region_offset)

    # -- lookups ------------------------------------------------------------------------------------------
    def payload(self, block: int) -> tuple[int, int]:
        """(state, file offset) of payload block ``block``.

        On every request's path: Geometry.payload_index, the page and entry_offset written out.
        """
        index = block + block // self._chunk_ratio
        page = self.pages[index >> _PAGE_SHIFT]
        if page is None:
            return 0, 0
        e = page[index & _IN_PAGE]
        return e & 7, (e >> OFFSET_SHIFT) << OFFSET_SHIFT  # == entry_offset(e)

    def entry(self, index: int) -> int:
        page = self.pages[index >> _PAGE_SHIFT]
        return 0 if page is None else page[index & _IN_PAGE]

    def bitmap(self, chunk: int) -> tuple[int, int]:
        e = self.entry(self.geometry.bitmap_index(chunk))
        return e & 7, entry_offset(e)

    def next_block_held(self, block: int) -> int:
        """The first payload block after ``block`` that may hold anything: every block in between is
        NOT_PRESENT (its entry is zero). A bitmap entry in the way counts as holding (the block after it is
        answered), so the answer is never too far; ``data_blocks`` when nothing follows. Skips a page of
        zeros, present or not, at C speed: a stretch of unallocated blocks costs a few steps, not one each."""
        g = self.geometry
        index = g.payload_index(block) + 1
        number = index >> _PAGE_SHIFT
        k = bisect.bisect_left(self._present, number)
        while k < len(self._present):
            number = self._present[k]
            page = self.pages[number]
            assert page is not None
            start = max(index - number * ENTRIES_PER_PAGE, 0)
            raw = page[start:].tobytes()
            zeros = len(raw) - len(raw.lstrip(b"\0"))
            if zeros < len(raw):
                found = number * ENTRIES_PER_PAGE + start + zeros // 8
                return min(found - found // (g.chunk_ratio + 1), g.data_blocks)
            k += 1
        return g.data_blocks

    def to_array(self, count: int) -> array[int]:
        """Entries [0, count) as one array (a resize builds the new table from it)."""
        out = array("Q", bytes(8 * count))
        for number, page in enumerate(self.pages):
            start = number * ENTRIES_PER_PAGE
            if page is not None and start < count:
                out[start:min(count, start + ENTRIES_PER_PAGE)] = page[:count - start]
        return out

    # -- changes ------------------------------------------------------------------------------------------
    def _set(self, index: int, value: int) -> None:
        number = index >> _PAGE_SHIFT
        page = self.pages[number]
        if page is None:
            if not value:
                return
            page = self.pages[number] = array("Q", _ZERO_PAGE)
            bisect.insort(self._present, number)
        if page[index & _IN_PAGE] != value:
            page[index & _IN_PAGE] = value
            self.dirty.add(number)

    def set_payload(self, block: int, state: int, file_offset: int = 0) -> None:
        self._set(self.geometry.payload_index(block), make_entry(state, file_offset))

    def set_bitmap(self, chunk: int, state: int, file_offset: int = 0) -> None:
        self._set(self.geometry.bitmap_index(chunk), make_entry(state, file_offset))

    def page_bytes(self, number: int) -> bytes:
        """The 4 KiB page ``number`` as it belongs on disk (entries past the table read as zeros)."""
        page = self.pages[number]
        if page is None:
            return _ZERO_PAGE
        if sys.byteorder != "little":
            page = array("Q", page)
            page.byteswap()
        return page.tobytes()

    def pages_for(self, pages: set[int]) -> dict[int, bytes]:
        """File offset -> contents of the given pages."""
        return {self.region_offset + p * LOG_SECTOR_SIZE: self.page_bytes(p) for p in sorted(pages)}

    def take_dirty_pages(self) -> dict[int, bytes]:
        """Snapshot and clear the dirty pages: file offset -> page contents."""
        return self.pages_for(self.dirty.take())

    # -- iteration and validation -------------------------------------------------------------------------
    def notable(self) -> Iterator[tuple[int, int]]:
        """(index, entry) for every entry that holds file space or could be invalid.

        Pages of zeros are not even there; in a page, bare payload states 0-3 with no offset (what most
        of a large sparse BAT holds, zero or not: QEMU marks unallocated blocks ZERO) are skipped at C
        speed; bitmap entries are always yielded when non-zero, since a bare value there is invalid.
        """
        g = self.geometry
        step = g.chunk_ratio + 1
        for number, page in enumerate(self.pages):
            if page is None:
                continue
            base = number * ENTRIES_PER_PAGE
            if set(page) <= _BARE:
                first = base + (g.chunk_ratio - base) % step  # first bitmap index >= base
                for index in range(first, base + ENTRIES_PER_PAGE, step):
                    if page[index - base]:
                        yield index, page[index - base]
                continue
            for i, e in enumerate(page):
                if e > 3 or (e and g.is_bitmap_index(base + i)):
                    yield base + i, e

    def holding(self) -> Iterator[tuple[int, int]]:
        """(index, entry) for every entry other than zero (NOT_PRESENT): what a layer answers for itself."""
        for number, page in enumerate(self.pages):
            if page is None or page.count(0) == ENTRIES_PER_PAGE:
                continue
            base = number * ENTRIES_PER_PAGE
            for i, e in enumerate(page):
                if e:
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
