"""Offline structure changes written through the log: region tables, metadata items, BAT pages.

The engine (core.py) journals only BAT and sector bitmap pages. The offline tools (resize, commit, compact,
repair) change structures it never touches, and must leave an image that opens cleanly after a crash at
any instant, just as the engine does. They follow the same order as the engine's flush and close
(docs/design.md): LogGuid goes into the header before the first log entry; each entry is durable before
its pages are written in place; once those pages are durable, LogGuid is cleared.

A change whose parts must take effect together (a new region table with the new disk size, a parent
locator moved within the metadata region) has to fit one log entry: ``commit_atomic`` refuses, before
writing anything, a change that would need more than one.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from types import TracebackType

from ...errors import CorruptImageError, Reason, VhdxError
from ...format import guids
from ...format import metadata as mdfmt
from ...format.constants import LOG_SECTOR_SIZE, METADATA_TABLE_SIZE
from .journal import LogWriter
from .loader import VhdxFile

PAGE = LOG_SECTOR_SIZE
# Metadata table layout (2.6.1.1, 2.6.1.2): a 32-byte header, then 32-byte entries whose Offset and
# Length fields (uint32 each) follow the 16-byte ItemId.
_TABLE_HEADER_SIZE = 32
_ENTRY_SIZE = 32
_ENTRY_OFFSET_LENGTH = struct.Struct("<II")
_ITEM_ALIGNMENT = 8


class PageEdits:
    """Byte patches gathered into whole 4 KiB pages, the unit the log writes.

    Pages are read from the file on first touch; ``changed()`` keeps only the pages whose bytes differ
    from what the file holds, so rewriting a structure with the same contents costs nothing.
    """

    def __init__(self, read: Callable[[int, int], bytes]) -> None:
        self._read = read
        self._pages: dict[int, bytearray] = {}
        self._original: dict[int, bytes] = {}

    def patch(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        pos = 0
        while pos < len(data):
            at = offset + pos
            page = at - at % PAGE
            if page not in self._pages:
                original = self._read(page, PAGE)
                self._original[page] = original
                self._pages[page] = bytearray(original)
            n = min(PAGE - (at - page), len(data) - pos)
            self._pages[page][at - page:at - page + n] = data[pos:pos + n]
            pos += n

    def changed(self) -> dict[int, bytes]:
        return {p: bytes(b) for p, b in sorted(self._pages.items()) if b != self._original[p]}


def changed_pages(offset: int, old: bytes, new: bytes) -> dict[int, bytes]:
    """Pages of ``new`` (placed at file offset ``offset``, page aligned) that differ from ``old``."""
    if offset % PAGE or len(new) % PAGE:
        raise ValueError("whole pages only")
    return {offset + i: new[i:i + PAGE] for i in range(0, len(new), PAGE) if old[i:i + PAGE] != new[i:i + PAGE]}


class LoggedUpdate:
    """One offline change of an image opened writable (``VhdxFile.open``), as a context manager.

    Entering sets a new DataWriteGuid when asked (the virtual disk's contents or shape change, 2.2.2.1),
    then LogGuid, through the image's HeaderState; leaving without an error makes everything durable and
    clears LogGuid. An error after the first entry leaves LogGuid set: the next open replays what was
    logged, which is safe because every entry on its own leaves the image consistent.
    """

    def __init__(self, image: VhdxFile, *, new_data_write_guid: bool = False) -> None:
        if image.read_only:
            raise VhdxError("internal: a logged update needs a writable open", path=image.path,
                            reason=Reason.INTERNAL)
        self.image = image
        self.new_data_write_guid = new_data_write_guid
        self.writer = LogWriter(image.host, image.headers)

    def __enter__(self) -> LoggedUpdate:
        self.image.host.fdatasync()  # whatever the entries will refer to is durable first
        self.image.headers.begin_file_writes()
        if self.new_data_write_guid:
            self.image.headers.begin_data_writes()
        self.image.headers.open_log()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.image.host.fdatasync()
            self.image.headers.close_log()
        elif not self.writer.entries_written:
            try:  # nothing was logged: leave the image clean if the host still lets us
                self.image.headers.close_log()
            except VhdxError:
                pass
        # else: the log holds complete entries and the next open replays them.

    @property
    def max_pages(self) -> int:
        return self.writer.max_pages_per_entry

    def commit(self, pages: dict[int, bytes], file_size: int) -> None:
        """Write ``pages`` through the log, as many entries as they need.

        Use only for pages whose change is safe in any subset: e.g. BAT entries nobody reads yet.
        """
        if pages:
            self.writer.commit(pages, file_size)
            self.image.host.fdatasync()

    def commit_atomic(self, pages: dict[int, bytes], file_size: int) -> None:
        """Write ``pages`` through the log as one entry, so after a crash either all or none took effect."""
        check_fits(self.image, len(pages), self.max_pages)
        self.commit(pages, file_size)


def check_fits(image: VhdxFile, pages: int, max_pages: int) -> None:
    if pages > max_pages:
        raise VhdxError(f"the change needs {pages} log pages at once but one log entry holds {max_pages}",
                        path=image.path, field="Header.LogLength", reason=Reason.NO_ROOM)


# -- metadata items -----------------------------------------------------------------------------------------
def _metadata_table(image: VhdxFile) -> tuple[int, int, list[mdfmt.MetadataEntry]]:
    region = image.regions.region(guids.METADATA_REGION)
    table = mdfmt.decode_table(image.read_meta(region.file_offset, METADATA_TABLE_SIZE), region.length)
    return region.file_offset, region.length, table


def replace_item(image: VhdxFile, edits: PageEdits, item_id: uuid.UUID, data: bytes) -> None:
    """Patch ``edits`` so the system metadata item ``item_id`` holds ``data``.

    The item stays where it is when it still fits there; otherwise it moves to the first gap in the
    metadata region that holds it, and its table entry follows. Both changes land in ``edits``, which the
    caller commits as one log entry, so no reader ever sees the entry and the item disagree.
    """
    region_offset, region_length, table = _metadata_table(image)
    index = next((i for i, e in enumerate(table) if e.item_id == item_id and not e.is_user), None)
    if index is None:
        raise CorruptImageError(f"metadata item {item_id} is missing", path=image.path, field="MetadataTable",
                                reason=Reason.CORRUPT_METADATA)
    entry = table[index]
    if len(data) <= entry.length:
        at = entry.offset
        # Clear the bytes the item no longer uses, so nothing stale trails it.
        edits.patch(region_offset + at, data + bytes(entry.length - len(data)))
    else:
        gap = _free_gap(table, index, len(data), region_length)
        if gap is None:
            raise VhdxError(f"no room for {len(data)} bytes of metadata item {item_id} in the metadata region",
                            path=image.path, field="MetadataTable", reason=Reason.NO_ROOM)
        at = gap
        edits.patch(region_offset + at, data)
    edits.patch(region_offset + _TABLE_HEADER_SIZE + index * _ENTRY_SIZE + 16,
                _ENTRY_OFFSET_LENGTH.pack(at, len(data)))


def _free_gap(table: list[mdfmt.MetadataEntry], skip: int, length: int, region_length: int) -> int | None:
    """First 8-byte aligned offset past the table where ``length`` bytes overlap no other item."""
    spans = sorted((e.offset, e.offset + e.length) for i, e in enumerate(table) if i != skip and e.length)
    at = METADATA_TABLE_SIZE
    for start, end in spans:
        if at + length <= start:
            return at
        at = max(at, -(-end // _ITEM_ALIGNMENT) * _ITEM_ALIGNMENT)
    return at if at + length <= region_length else None
