"""`vhdxfs check --repair`: bring a damaged image back to a consistent state, and say what changed.

An ordinary open (VhdxFile.open) refuses a damaged image outright, as it must. Repair needs a loader that
walks the same structures in the same order but keeps going where it can: it is built here from the format
layer, and writes only when something needs fixing (a clean image is left byte for byte as it was).

What is repaired, in this order (each step needs the ones before it):
1. a damaged header (bad signature or checksum), or two headers that disagree at the same sequence number:
   both are rewritten from the good one (2.2.2.1, which also gives the file a new FileWriteGuid);
2. a dirty log: its active sequence is replayed into the file and LogGuid cleared, as a writable open does;
3. a damaged region table copy, or copies that differ: rewritten from the copy an open uses (the first
   valid one), through the log;
4. BAT entries with an invalid state or reserved bits set, or whose block lies outside the file, overlaps
   the header section, log or a region, or overlaps another block. Such a payload block becomes ZERO: it
   reads as zeros in every kind of image. NOT_PRESENT was the other choice, but in a differencing image it
   would show the parent's older data as if it were current, and silently; zeros make the loss visible.
   Two blocks that overlap each other both become ZERO, since nothing tells which one the space really
   belongs to, and a block returning another block's data is worse than one returning zeros. A damaged
   sector bitmap entry becomes NOT_PRESENT, and the PARTIALLY_PRESENT blocks of its chunk become ZERO
   (which of their sectors are present is no longer known). BAT changes go through the log.

What cannot be repaired is reported and the image is left alone from that step on: no valid header, both
region table copies damaged, a damaged metadata region, a log whose entries write outside the structures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine import journal
from ..engine.bat import BITMAP_STATES, PAYLOAD_STATES, BlockAllocationTable
from ..engine.hostfile import HostFile
from ..engine.image import VhdxFile
from ..engine.metadata_update import LoggedUpdate, PageEdits
from ..errors import CorruptImageError, VhdxError
from ..format import guids
from ..format import metadata as mdfmt
from ..format.bat import RESERVED_MASK, BitmapState, Geometry, PayloadState, entry_state
from ..format.constants import (
    HEADER_OFFSETS,
    HEADER_SECTION_SIZE,
    HEADER_SIZE,
    METADATA_TABLE_SIZE,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
    MiB,
)
from ..format.header import Header, check_file_identifier
from ..format.region import RegionTable


class Unrepairable(Exception):
    """Damage this tool cannot fix; the message says what."""


class Repairer:
    def __init__(self, host: HostFile) -> None:
        self.host = host
        self.image = VhdxFile(host, read_only=False)
        self.repairs: list[str] = []
        self._writing = False

    def _begin_writing(self) -> None:
        """2.2.2.1: before the first change, both headers are rewritten with a new FileWriteGuid."""
        if not self._writing:
            self.image.update_header(file_write_guid=guids.new_guid())
            self._writing = True

    # -- 1. headers ---------------------------------------------------------------------------------------
    def headers(self) -> None:
        raw = [self.host.pread(off, HEADER_SIZE) for off in HEADER_OFFSETS]
        decoded = [Header.decode(r) for r in raw]
        valid = [(i, h) for i, h in enumerate(decoded) if h is not None]
        if not valid:
            raise Unrepairable("neither header is valid (bad signature or checksum)")
        index, header = max(valid, key=lambda item: (item[1].sequence_number, -item[0]))
        try:
            header.validate(self.host.size())
        except VhdxError as exc:
            raise Unrepairable(f"header {index + 1}: {exc}") from None
        self.image.header, self.image.header_index = header, index
        if len(valid) == 1:
            self._begin_writing()
            self.repairs.append(f"header {2 - index} was damaged; rewrote both headers from header {index + 1}")
        elif decoded[0].sequence_number == decoded[1].sequence_number and decoded[0] != decoded[1]:
            self._begin_writing()
            self.repairs.append("the headers differed at the same sequence number; rewrote both from header 1")

    # -- 2. log -------------------------------------------------------------------------------------------
    def log(self) -> None:
        header = self.image.header
        if header.log_is_empty:
            return
        try:
            entries = journal.read_active_sequence(self.host, header)
        except VhdxError as exc:
            raise Unrepairable(f"the log cannot be replayed: {exc}") from None
        self._begin_writing()
        journal.replay_into_file(self.host, entries)
        self.image.update_header(log_guid=guids.NULL_GUID)
        if entries:
            self.repairs.append(f"replayed {len(entries)} log entries and cleared the log")
        else:
            self.repairs.append("the log was marked dirty but held no complete entry; cleared it")

    # -- 3. region tables ---------------------------------------------------------------------------------
    def region_tables(self) -> None:
        size = self.host.size()
        tables: list[RegionTable | None] = []
        for off in REGION_TABLE_OFFSETS:
            try:
                tables.append(RegionTable.decode(self.host.pread(off, REGION_TABLE_SIZE)))
            except VhdxError:
                tables.append(None)
        chosen, reasons = None, []
        for i, table in enumerate(tables):
            if table is None:
                reasons.append(f"region table copy {i + 1} is damaged (bad signature or checksum)")
                continue
            try:
                table.validate(size)
            except VhdxError as exc:
                reasons.append(f"region table copy {i + 1}: {exc}")
                continue
            chosen = chosen if chosen is not None else (i, table)
        if chosen is None:
            raise Unrepairable("no usable region table: " + "; ".join(reasons))
        good, table = chosen
        self.image.regions = table
        bad = [i for i, t in enumerate(tables) if t != table]
        if not bad:
            return
        raw = self.host.pread(REGION_TABLE_OFFSETS[good], REGION_TABLE_SIZE)
        edits = PageEdits(self.host.pread)
        for i in bad:
            edits.patch(REGION_TABLE_OFFSETS[i], raw)
        self._log(edits.changed(), atomic=True)
        for i in bad:
            self.repairs.append(f"rewrote region table copy {i + 1} from copy {good + 1} "
                                f"({'damaged' if tables[i] is None else 'it differed or was invalid'})")

    # -- 4. metadata and BAT ------------------------------------------------------------------------------
    def metadata(self) -> None:
        image = self.image
        log_end = image.header.log_offset + image.header.log_length
        for e in image.regions.entries:
            if e.file_offset < log_end and image.header.log_offset < e.end:
                raise Unrepairable("a region overlaps the log")
        region = image.regions.find(guids.METADATA_REGION)
        try:
            table = mdfmt.decode_table(self.host.pread(region.file_offset, METADATA_TABLE_SIZE), region.length)
            image.metadata = mdfmt.decode_items(table, lambda o, n: self.host.pread(region.file_offset + o, n))
        except VhdxError as exc:
            raise Unrepairable(f"the metadata region is damaged: {exc}") from None
        m = image.metadata
        image.geometry = Geometry(m.virtual_size, m.block_size, m.logical_sector_size, m.has_parent)
        bat_region = image.regions.find(guids.BAT_REGION)
        if bat_region.length < image.geometry.bat_bytes:
            raise Unrepairable(f"the BAT region ({bat_region.length} bytes) cannot hold "
                               f"{image.geometry.total_entries} entries")
        raw = self.host.pread(bat_region.file_offset, image.geometry.bat_bytes)
        image.bat = BlockAllocationTable(image.geometry, raw, bat_region.file_offset)

    def bat(self) -> None:
        image, g, bat = self.image, self.image.geometry, self.image.bat
        size = self.host.size()
        bad: dict[int, str] = {}
        for index, e in bat.notable():
            state, is_bitmap = entry_state(e), g.is_bitmap_index(index)
            if state not in (BITMAP_STATES if is_bitmap else PAYLOAD_STATES) or e & RESERVED_MASK:
                bad[index] = f"had an invalid state or reserved bits (0x{e:016x})"
            elif not g.has_parent and ((is_bitmap and state == BitmapState.PRESENT)
                                       or state == PayloadState.PARTIALLY_PRESENT and not is_bitmap):
                bad[index] = f"had a differencing-only state in a {image.disk_type} image (0x{e:016x})"
        spans = sorted(image.reserved_spans())
        ranges = [r for r in bat.allocated_ranges() if r[2] not in bad]
        owner_end, owner = HEADER_SECTION_SIZE, None
        for offset, length, index in ranges:
            if offset < HEADER_SECTION_SIZE or offset + length > size:
                bad[index] = f"pointed at {offset}+{length}, outside the file ({size} bytes)"
                continue
            hit = next((name for r_off, r_len, name in spans if offset < r_off + r_len and r_off < offset + length),
                       None)
            if hit is not None:
                bad[index] = f"pointed at {offset}, inside the {hit}"
                continue
            if owner is not None and offset < owner_end:
                bad[index] = f"pointed at {offset}, overlapping the block of BAT entry {owner}"
                bad.setdefault(owner, f"overlapped the block of BAT entry {index}")
            if offset + length > owner_end or owner is None:
                owner_end, owner = offset + length, index
        for index in sorted(bad):
            if g.is_bitmap_index(index):
                chunk = index // (g.chunk_ratio + 1)
                for block in range(chunk * g.chunk_ratio, min((chunk + 1) * g.chunk_ratio, g.data_blocks)):
                    if bat.payload(block)[0] == PayloadState.PARTIALLY_PRESENT:
                        bad.setdefault(g.payload_index(block), "was PARTIALLY_PRESENT in the chunk of a damaged "
                                                               "sector bitmap")
        if not bad:
            return
        for index in sorted(bad):
            if g.is_bitmap_index(index):
                chunk = index // (g.chunk_ratio + 1)
                bat.set_bitmap(chunk, BitmapState.NOT_PRESENT)
                self.repairs.append(f"BAT entry {index} (sector bitmap of chunk {chunk}) {bad[index]}; "
                                    "now NOT_PRESENT")
            else:
                block = g.block_of_index(index)
                bat.set_payload(block, PayloadState.ZERO)
                self.repairs.append(f"BAT entry {index} (payload block {block}, virtual offset "
                                    f"{block * g.block_size}) {bad[index]}; now ZERO (reads as zeros)")
        self._log(bat.take_dirty_pages(), atomic=False)

    def _log(self, pages: dict[int, bytes], *, atomic: bool) -> None:
        if not pages:
            return
        self._begin_writing()
        with LoggedUpdate(self.image) as update:
            size = max(self.host.size(), *(o + len(p) for o, p in pages.items()))
            if atomic:
                update.commit_atomic(pages, -(-size // MiB) * MiB)
            else:
                update.commit(pages, -(-size // MiB) * MiB)


def repair_image(path: str | Path) -> dict[str, Any]:
    """Repair what can be repaired; return {'repairs': [...], 'unrepairable': str | None}."""
    host = HostFile(path, writable=True)
    try:
        check_file_identifier(host.pread(0, 520))
        if host.size() < HEADER_SECTION_SIZE:
            return {"repairs": [], "unrepairable": "the file is smaller than the 1 MiB header section"}
        fixer = Repairer(host)
        try:
            fixer.headers()
            fixer.log()
            fixer.region_tables()
            fixer.metadata()
            fixer.bat()
        except Unrepairable as exc:
            return {"repairs": fixer.repairs, "unrepairable": str(exc)}
        except CorruptImageError as exc:
            return {"repairs": fixer.repairs, "unrepairable": exc.message}
        if fixer._writing:
            host.fdatasync()
        return {"repairs": fixer.repairs, "unrepairable": None}
    except VhdxError as exc:
        raise exc.with_path(path) from None
    finally:
        host.close()
