"""One VHDX file opened: headers, region table, log replay, metadata and BAT, all validated.

The one loader of the project. A strict open (the default) refuses a damaged image with the first error
it finds, as every user of an image but repair must. A lenient open (``lenient=True``, for check and
repair) walks the same structures in the same order but keeps going where it can: a damaged header or
region table copy, copies that disagree, and BAT entries that are invalid or misplaced are collected in
``observations`` and ``bad_entries`` instead; what no step can do without (no valid header, no usable
region table, damaged metadata, a log that cannot be replayed) still raises. A lenient open writes
nothing, not even on a writable host: its log is replayed in memory until ``apply_log``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from enum import Enum

from ...errors import CorruptImageError, Reason, UnsupportedError, VhdxError
from ...format import guids
from ...format import log as logfmt
from ...format import metadata as mdfmt
from ...format.bat import Geometry
from ...format.constants import (
    HEADER_OFFSETS,
    HEADER_SECTION_SIZE,
    HEADER_SIZE,
    METADATA_TABLE_SIZE,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
)
from ...format.header import Header, check_file_identifier, current_header
from ...format.region import RegionTable
from . import journal
from .block_table import BlockAllocationTable, stored_pages
from .headers import HeaderState
from .host import HostFactory, HostIO
from .hosts import open_host
from .locations import S3Location
from .posix import PosixFile
from .spacemap import SpaceMap, Span


class Finding(Enum):
    """What a lenient open got past (or a strict one tolerated) that check reports and repair mends."""

    HEADER_DAMAGED = "header-damaged"  # bad signature or checksum; the other header is in use
    HEADER_UNUSABLE = "header-unusable"  # checksum holds, but its log lies outside the file or is misaligned
    HEADERS_DIFFER = "headers-differ"  # both valid, same sequence number, different contents
    REGION_TABLE_DAMAGED = "region-table-damaged"
    REGION_TABLE_INVALID = "region-table-invalid"  # checksum holds, contents do not validate
    REGION_TABLES_DIFFER = "region-tables-differ"


@dataclass(frozen=True)
class Observation:
    """One finding, with the copy it is about (0 or 1; None for both) and the sentence a report prints."""

    finding: Finding
    copy: int | None
    message: str


class VhdxFile:
    """The parsed structures of one image file and the host file they came from."""

    def __init__(self, host: HostIO, *, read_only: bool, lenient: bool = False) -> None:
        self.host = host
        self.path = host.path
        self.read_only = read_only
        self.lenient = lenient
        self.overlay: journal.Overlay | None = None
        self.log_entries: list[logfmt.LogEntry] = []
        self.replayed_entries = 0
        self.headers: HeaderState
        self.regions: RegionTable
        self.region_table_copy = 0  # which copy (0 or 1) the open uses
        self.metadata: mdfmt.Metadata
        self.geometry: Geometry
        self.bat: BlockAllocationTable
        self.creator = ""
        self.observations: list[Observation] = []  # what was got past: non-fatal
        self.bad_entries: dict[int, str] = {}  # lenient opens: BAT index -> what is wrong with it

    # -- opening ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str] | S3Location, *, read_only: bool = False, lenient: bool = False,
             host_factory: HostFactory = PosixFile, data_write_guid: uuid.UUID | None = None) -> VhdxFile:
        """Open and validate ``path``; ``data_write_guid``: the DataWriteGuid the first write sets (commit)."""
        host = open_host(path, writable=not read_only, local_factory=host_factory)
        try:
            return cls.load(host, read_only=read_only, lenient=lenient, data_write_guid=data_write_guid)
        except VhdxError as exc:
            host.close()
            raise exc.with_path(path) from None
        except BaseException:
            host.close()
            raise

    @classmethod
    def load(cls, host: HostIO, *, read_only: bool = False, lenient: bool = False,
             data_write_guid: uuid.UUID | None = None) -> VhdxFile:
        """Load the image a host file already open holds (a live resize reads its new structures afresh
        through the same open file, its lock never let go); the caller closes the host on failure."""
        image = cls(host, read_only=read_only, lenient=lenient)
        image._load(data_write_guid)
        return image

    @property
    def header(self) -> Header:
        return self.headers.header

    def _load(self, data_write_guid: uuid.UUID | None) -> None:
        host = self.host
        size = host.size()
        self.creator = check_file_identifier(host.pread(0, 520))
        if size < HEADER_SECTION_SIZE:
            raise CorruptImageError(f"file is {size} bytes, smaller than the 1 MiB header section",
                                    field="FileTypeIdentifier", reason=Reason.TRUNCATED)
        index, header = self._choose_header(size)
        header.validate(size)
        self.headers = HeaderState(host, header, index, writable=not self.read_only,
                                   data_write_guid=data_write_guid)
        self.log_entries = journal.read_active_sequence(host, header)
        self.replayed_entries = len(self.log_entries)
        if self.read_only or self.lenient:
            self.overlay = journal.replay_into_overlay(self.log_entries) if self.log_entries else None
        else:
            self.apply_log()
        self._load_structures()

    def _choose_header(self, size: int) -> tuple[int, Header]:
        raw = [self.host.pread(off, HEADER_SIZE) for off in HEADER_OFFSETS]
        decoded = [Header.decode(r) for r in raw]
        valid = [(i, h) for i, h in enumerate(decoded) if h is not None]
        if self.lenient and len(valid) == 2:
            decoded = self._drop_unusable_header(decoded, size)
            valid = [(i, h) for i, h in enumerate(decoded) if h is not None]
        for i, h in enumerate(decoded):
            if h is None and valid:
                self.observations.append(Observation(Finding.HEADER_DAMAGED, i,
                                                     f"header {i + 1} is damaged; the other one is in use"))
        if len(valid) == 2 and valid[0][1].sequence_number == valid[1][1].sequence_number \
                and valid[0][1] != valid[1][1]:
            if not self.lenient:
                current_header(*raw)  # raises: which header is current cannot be told
            self.observations.append(Observation(Finding.HEADERS_DIFFER, None,
                                                 "the headers differ at the same sequence number"))
        if not self.lenient or not valid:
            return current_header(*raw)
        return max(valid, key=lambda item: (item[1].sequence_number, -item[0]))

    def _drop_unusable_header(self, decoded: list[Header | None], size: int) -> list[Header | None]:
        """Lenient opens: a header whose checksum holds but whose log lies outside the file (or is
        misaligned) counts as damaged when the other header is usable, so repair can rewrite it from the
        other one instead of calling the image unrepairable. A header of an unsupported version is not
        dropped: falling back past it could turn a newer image into an older one."""
        reasons: dict[int, str] = {}
        for i, header in enumerate(decoded):
            if header is None:
                continue
            try:
                header.validate(size)
            except CorruptImageError as exc:
                reasons[i] = exc.message
            except UnsupportedError:
                return decoded
        if len(reasons) != 1:
            return decoded
        (bad, reason), = reasons.items()
        self.observations.append(Observation(Finding.HEADER_UNUSABLE, bad, f"header {bad + 1} is unusable ({reason})"))
        return [None if i == bad else h for i, h in enumerate(decoded)]

    def apply_log(self) -> None:
        """Writable opens: the file gets a new FileWriteGuid (2.2.2.1: before anything else changes), a
        dirty log is replayed into it and LogGuid cleared; the in-memory overlay is no longer needed."""
        self.headers.begin_file_writes()
        if self.headers.log_guid is not None:
            journal.replay_into_file(self.host, self.log_entries)
            self.headers.close_log()
        self.overlay = None

    def _choose_region_table(self, size: int) -> RegionTable:
        tables = [RegionTable.decode(self.read_meta(off, REGION_TABLE_SIZE)) for off in REGION_TABLE_OFFSETS]
        for i, table in enumerate(tables):
            if table is None:
                self.observations.append(Observation(Finding.REGION_TABLE_DAMAGED, i,
                                                     f"region table copy {i + 1} is damaged"))
        if all(tables) and tables[0] != tables[1]:
            self.observations.append(Observation(Finding.REGION_TABLES_DIFFER, None,
                                                 "the two region table copies differ"))
        reasons = []
        for i, table in enumerate(tables):
            if table is None:
                continue
            try:
                table.validate(size)
            except VhdxError as exc:
                if not self.lenient:
                    raise
                reasons.append(f"region table copy {i + 1}: {exc}")
                self.observations.append(Observation(Finding.REGION_TABLE_INVALID, i, reasons[-1]))
                continue
            self.region_table_copy = i
            return table
        if not reasons:
            raise CorruptImageError("both region tables are damaged (bad signature or checksum)",
                                    field="RegionTable", reason=Reason.CORRUPT_REGION_TABLE)
        raise CorruptImageError("no usable region table: " + "; ".join(reasons), field="RegionTable",
                                reason=Reason.CORRUPT_REGION_TABLE)

    def _load_structures(self) -> None:
        size = self.file_size()
        regions = self._choose_region_table(size)
        log_end = self.header.log_offset + self.header.log_length
        for e in regions.entries:
            if e.file_offset < log_end and self.header.log_offset < e.end:
                raise CorruptImageError("a region overlaps the log", field="RegionTable.FileOffset",
                                        reason=Reason.CORRUPT_REGION_TABLE)
        self.regions = regions
        meta_region = regions.region(guids.METADATA_REGION)
        table = mdfmt.decode_table(self.read_meta(meta_region.file_offset, METADATA_TABLE_SIZE), meta_region.length)
        self.metadata = mdfmt.decode_items(table, lambda off, n: self.read_meta(meta_region.file_offset + off, n))
        m = self.metadata
        self.geometry = Geometry(m.virtual_size, m.block_size, m.logical_sector_size, m.has_parent)
        bat_region = regions.region(guids.BAT_REGION)
        if bat_region.length < self.geometry.bat_bytes:
            raise CorruptImageError(f"BAT region of {bat_region.length} bytes cannot hold "
                                    f"{self.geometry.total_entries} entries", field="RegionTable.Length",
                                    reason=Reason.CORRUPT_REGION_TABLE)
        pages = stored_pages(self.host, self.overlay, self.read_meta, bat_region.file_offset, self.geometry.bat_bytes)
        self.bat = BlockAllocationTable(self.geometry, pages, bat_region.file_offset)
        bad = self.bat.entry_problems(self.disk_type)
        bad.update(self.space_map(exclude=bad).problems())
        if bad and not self.lenient:
            index = min(bad)
            raise CorruptImageError(f"BAT entry {index} {bad[index]}", path=self.path, field="BAT",
                                    reason=Reason.CORRUPT_BAT)
        self.bad_entries = bad

    # -- structure I/O ------------------------------------------------------------------------------------
    def file_size(self) -> int:
        size = self.host.size()
        if self.overlay is not None:
            size = max(size, self.overlay.min_size)
        return size

    def read_meta(self, offset: int, length: int) -> bytes:
        """Read file bytes as the replayed log says they are (read-only opens keep the log in memory)."""
        data = self.host.pread(offset, length)
        if self.overlay:
            buf = bytearray(data)
            self.overlay.patch(offset, buf)
            return bytes(buf)
        return data

    def structures(self) -> list[Span]:
        """The header section, the log and the regions, as spans of the file."""
        spans = [Span(0, HEADER_SECTION_SIZE, None, "header section"),
                 Span(self.header.log_offset, self.header.log_length, None, "log")]
        for e in self.regions.entries:
            spans.append(Span(e.file_offset, e.length, None, "BAT region" if e.guid == guids.BAT_REGION else
                              "metadata region" if e.guid == guids.METADATA_REGION else f"region {e.guid}"))
        return spans

    def space_map(self, exclude: dict[int, str] | None = None) -> SpaceMap:
        """Structures and allocated blocks of the file (BAT entries in ``exclude`` left out)."""
        return SpaceMap(self.file_size(), self.structures(), self.bat.spans(exclude))

    @property
    def is_differencing(self) -> bool:
        return self.metadata.has_parent

    @property
    def disk_type(self) -> str:
        if self.metadata.has_parent:
            return "differencing"
        return "fixed" if self.metadata.leave_block_allocated else "dynamic"

    def close(self) -> None:
        self.host.close()
