"""One VHDX file opened: headers, region table, log replay, metadata and BAT, all validated.

This is the synchronous core shared by the async VirtualDisk (which runs it in a worker thread) and the
offline tools. Header updates (2.2.2.1) live here too, since only the file as a whole knows its headers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import CorruptImageError, VhdxError
from ..format import guids
from ..format import metadata as mdfmt
from ..format.bat import Geometry
from ..format.constants import (
    HEADER_OFFSETS,
    HEADER_SECTION_SIZE,
    HEADER_SIZE,
    METADATA_TABLE_SIZE,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
)
from ..format.header import Header, check_file_identifier, current_header
from ..format.region import RegionTable
from . import journal
from .bat import BlockAllocationTable
from .hostfile import HostFile

HostFactory = Callable[..., HostFile]


class VhdxFile:
    """The parsed structures of one image file and the host file they came from."""

    def __init__(self, host: HostFile, *, read_only: bool) -> None:
        self.host = host
        self.path = host.path
        self.read_only = read_only
        self.overlay: journal.Overlay | None = None
        self.replayed_entries = 0
        self.header_index = 0
        self.header: Header
        self.regions: RegionTable
        self.metadata: mdfmt.Metadata
        self.geometry: Geometry
        self.bat: BlockAllocationTable
        self.creator = ""

    # -- opening ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, read_only: bool = False, host_factory: HostFactory = HostFile) -> VhdxFile:
        host = host_factory(path, writable=not read_only)
        try:
            image = cls(host, read_only=read_only)
            image._load()
            return image
        except VhdxError as exc:
            host.close()
            raise exc.with_path(path) from None
        except BaseException:
            host.close()
            raise

    def _load(self) -> None:
        host = self.host
        size = host.size()
        self.creator = check_file_identifier(host.pread(0, 520))
        if size < HEADER_SECTION_SIZE:
            raise CorruptImageError(f"file is {size} bytes, smaller than the 1 MiB header section",
                                    field="FileTypeIdentifier")
        self.header_index, self.header = current_header(host.pread(HEADER_OFFSETS[0], HEADER_SIZE),
                                                        host.pread(HEADER_OFFSETS[1], HEADER_SIZE))
        self.header.validate(size)
        entries = journal.read_active_sequence(host, self.header)
        self.replayed_entries = len(entries)
        if self.read_only:
            self.overlay = journal.replay_into_overlay(entries) if entries else None
        else:
            # 2.2.2.1: the headers change (new FileWriteGuid) before anything else in the file, replay included.
            self.update_header(file_write_guid=guids.new_guid())
            if not self.header.log_is_empty:
                journal.replay_into_file(host, entries)
                self.update_header(log_guid=guids.NULL_GUID)
        self._load_structures()

    def _load_structures(self) -> None:
        size = self.file_size()
        tables = [RegionTable.decode(self.read_meta(off, REGION_TABLE_SIZE)) for off in REGION_TABLE_OFFSETS]
        regions = next((t for t in tables if t is not None), None)
        if regions is None:
            raise CorruptImageError("both region tables are damaged (bad signature or checksum)",
                                    field="RegionTable")
        regions.validate(size)
        log_end = self.header.log_offset + self.header.log_length
        for e in regions.entries:
            if e.file_offset < log_end and self.header.log_offset < e.end:
                raise CorruptImageError("a region overlaps the log", field="RegionTable.FileOffset")
        self.regions = regions
        meta_region = regions.find(guids.METADATA_REGION)
        table = mdfmt.decode_table(self.read_meta(meta_region.file_offset, METADATA_TABLE_SIZE), meta_region.length)
        self.metadata = mdfmt.decode_items(table, lambda off, n: self.read_meta(meta_region.file_offset + off, n))
        m = self.metadata
        self.geometry = Geometry(m.virtual_size, m.block_size, m.logical_sector_size, m.has_parent)
        bat_region = regions.find(guids.BAT_REGION)
        if bat_region.length < self.geometry.bat_bytes:
            raise CorruptImageError(f"BAT region of {bat_region.length} bytes cannot hold "
                                    f"{self.geometry.total_entries} entries", field="RegionTable.Length")
        raw = self.read_meta(bat_region.file_offset, self.geometry.bat_bytes)
        self.bat = BlockAllocationTable(self.geometry, raw, bat_region.file_offset)
        self.bat.validate(size, self.reserved_spans(), self.path)

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

    def reserved_spans(self) -> list[tuple[int, int, str]]:
        spans = [(0, HEADER_SECTION_SIZE, "header section"),
                 (self.header.log_offset, self.header.log_length, "log")]
        for e in self.regions.entries:
            spans.append((e.file_offset, e.length, "BAT region" if e.guid == guids.BAT_REGION else
                          "metadata region" if e.guid == guids.METADATA_REGION else f"region {e.guid}"))
        return spans

    def update_header(self, **changes: object) -> None:
        """2.2.2.1: write the next header over the non-current one, flush, and do it again so both agree."""
        if self.read_only:
            raise VhdxError("internal: header update on a read-only open", path=self.path)
        for _ in range(2):
            new = self.header.next(**changes)
            slot = 1 - self.header_index
            self.host.pwrite(HEADER_OFFSETS[slot], new.encode())
            self.host.fdatasync()
            self.header, self.header_index = new, slot

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
