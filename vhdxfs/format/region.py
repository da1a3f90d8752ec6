"""Region table (2.2.3): where the BAT and metadata regions live."""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from ..errors import CorruptImageError, Reason, UnsupportedError
from . import checksum
from .constants import HEADER_SECTION_SIZE, MAX_REGION_ENTRIES, REGION_SIGNATURE, REGION_TABLE_SIZE, MiB
from .guids import BAT_REGION, METADATA_REGION, guid_from_bytes, guid_to_bytes

_TABLE_HEADER = struct.Struct("<4sIII")
_ENTRY = struct.Struct("<16sQII")
_CHECKSUM_AT = 4
KNOWN_REGIONS = {BAT_REGION: "BAT", METADATA_REGION: "metadata"}


def _damaged(message: str, *, field: str) -> CorruptImageError:
    """An error about a damaged region table (every one has the same typed reason)."""
    return CorruptImageError(message, field=field, reason=Reason.CORRUPT_REGION_TABLE)


@dataclass(frozen=True)
class RegionEntry:
    guid: uuid.UUID
    file_offset: int
    length: int
    required: bool

    @property
    def end(self) -> int:
        return self.file_offset + self.length


@dataclass(frozen=True)
class RegionTable:
    entries: tuple[RegionEntry, ...]

    def encode(self) -> bytes:
        buf = bytearray(REGION_TABLE_SIZE)
        _TABLE_HEADER.pack_into(buf, 0, REGION_SIGNATURE, 0, len(self.entries), 0)
        for i, e in enumerate(self.entries):
            _ENTRY.pack_into(buf, _TABLE_HEADER.size + i * _ENTRY.size, guid_to_bytes(e.guid),
                             e.file_offset, e.length, 1 if e.required else 0)
        checksum.seal(buf, _CHECKSUM_AT)
        return bytes(buf)

    @classmethod
    def decode(cls, data: bytes) -> RegionTable | None:
        """The table, or None when its signature or checksum is bad (then the other copy is used)."""
        if len(data) < REGION_TABLE_SIZE:
            return None
        data = data[:REGION_TABLE_SIZE]
        sig, _crc, count, _reserved = _TABLE_HEADER.unpack_from(data)
        if sig != REGION_SIGNATURE or not checksum.verify(data, _CHECKSUM_AT):
            return None
        if count > MAX_REGION_ENTRIES:
            raise _damaged(f"{count} entries, more than {MAX_REGION_ENTRIES}",
                           field="RegionTable.EntryCount")
        entries = []
        for i in range(count):
            raw_guid, offset, length, required = _ENTRY.unpack_from(data, _TABLE_HEADER.size + i * _ENTRY.size)
            entries.append(RegionEntry(guid_from_bytes(raw_guid), offset, length, bool(required & 1)))
        return cls(tuple(entries))

    def find(self, guid: uuid.UUID) -> RegionEntry | None:
        return next((e for e in self.entries if e.guid == guid), None)

    def region(self, guid: uuid.UUID) -> RegionEntry:
        """The entry of a region every image has (BAT, metadata): ``validate`` makes sure they are there."""
        entry = self.find(guid)
        if entry is None:
            raise _damaged(f"the {KNOWN_REGIONS.get(guid, guid)} region is missing", field="RegionTable")
        return entry

    def validate(self, file_size: int) -> None:
        """Known regions present, every region aligned, inside the file and apart from the others."""
        seen: set[uuid.UUID] = set()
        for e in self.entries:
            name = KNOWN_REGIONS.get(e.guid, str(e.guid))
            if e.guid in seen:
                raise _damaged(f"region {name} listed twice", field="RegionTable.Guid")
            seen.add(e.guid)
            if e.guid not in KNOWN_REGIONS and e.required:
                raise UnsupportedError(f"required region {e.guid} is not understood",
                                       field="RegionTable.Required")
            if e.file_offset % MiB or e.file_offset < HEADER_SECTION_SIZE:
                raise _damaged(f"region {name} offset {e.file_offset} is not 1 MiB aligned past the "
                               "header section", field="RegionTable.FileOffset")
            if e.length == 0 or e.length % MiB:
                raise _damaged(f"region {name} length {e.length} is not a non-zero multiple of "
                               "1 MiB", field="RegionTable.Length")
            if e.end > file_size:
                raise _damaged(f"region {name} ends at {e.end}, past the end of the file "
                               f"({file_size} bytes)", field="RegionTable.FileOffset")
        for guid, name in KNOWN_REGIONS.items():
            if guid not in seen:
                raise _damaged(f"the {name} region is missing", field="RegionTable")
        ordered = sorted(self.entries, key=lambda e: e.file_offset)
        for a, b in zip(ordered, ordered[1:], strict=False):
            if a.end > b.file_offset:
                raise _damaged(
                               f"regions {KNOWN_REGIONS.get(a.guid, a.guid)} and {KNOWN_REGIONS.get(b.guid, b.guid)} "
                               "overlap", field="RegionTable.FileOffset")
