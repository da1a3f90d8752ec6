"""File type identifier (2.2.1) and the two headers (2.2.2)."""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, replace
from typing import Any

from ..errors import CorruptImageError, NotVhdxError, Reason, UnsupportedError
from . import checksum
from .constants import (
    ALIGNMENT,
    FILE_SIGNATURE,
    HEADER_SECTION_SIZE,
    HEADER_SIGNATURE,
    HEADER_SIZE,
    MiB,
)
from .guids import NULL_GUID, guid_from_bytes, guid_to_bytes

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
_CHECKSUM_AT = 4
_CREATOR_SIZE = 512


def encode_file_identifier(creator: str = "vhdxfs") -> bytes:
    """The first 64 KiB item: signature plus a UTF-16 creator string (diagnostic only)."""
    raw = creator.encode("utf-16-le")[:_CREATOR_SIZE - 2]
    return FILE_SIGNATURE + raw + b"\0" * (_CREATOR_SIZE - len(raw))


def check_file_identifier(data: bytes) -> str:
    """Validate the signature and return the creator string."""
    if len(data) < 8 or data[:8] != FILE_SIGNATURE:
        raise NotVhdxError("not a VHDX file (no 'vhdxfile' signature at offset 0)",
                                field="FileTypeIdentifier.Signature")
    creator = bytes(data[8:8 + _CREATOR_SIZE])
    return creator.decode("utf-16-le", errors="replace").split("\0", 1)[0]


@dataclass(frozen=True)
class Header:
    """One 4 KiB VHDX header; the one with the greater SequenceNumber among the valid ones is current."""

    sequence_number: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_length: int
    log_offset: int
    log_version: int = 0
    version: int = 1

    def encode(self) -> bytes:
        buf = bytearray(HEADER_SIZE)
        _HEADER.pack_into(
            buf, 0, HEADER_SIGNATURE, 0, self.sequence_number,
            guid_to_bytes(self.file_write_guid), guid_to_bytes(self.data_write_guid),
            guid_to_bytes(self.log_guid), self.log_version, self.version, self.log_length, self.log_offset,
        )
        checksum.seal(buf, _CHECKSUM_AT)
        return bytes(buf)

    @classmethod
    def decode(cls, data: bytes) -> Header | None:
        """Return the header, or None when signature or checksum do not validate (an invalid header)."""
        if len(data) < HEADER_SIZE:
            return None
        data = data[:HEADER_SIZE]
        sig, _crc, seq, fwg, dwg, lg, log_version, version, log_length, log_offset = _HEADER.unpack_from(data)
        if sig != HEADER_SIGNATURE or not checksum.verify(data, _CHECKSUM_AT):
            return None
        return cls(seq, guid_from_bytes(fwg), guid_from_bytes(dwg), guid_from_bytes(lg),
                   log_length, log_offset, log_version, version)

    @property
    def log_is_empty(self) -> bool:
        return self.log_guid == NULL_GUID

    def next(self, **changes: Any) -> Header:
        """The header that replaces this one: sequence number plus one, with ``changes`` applied."""
        return replace(self, sequence_number=self.sequence_number + 1, **changes)

    def validate(self, file_size: int) -> None:
        """Check the fields an open relies on, before any arithmetic uses them."""
        if self.version != 1:
            raise UnsupportedError(f"format version {self.version} is not 1", field="Header.Version")
        if self.log_version != 0 and not self.log_is_empty:
            raise UnsupportedError(f"log version {self.log_version} is not 0", field="Header.LogVersion")
        if self.log_length == 0 or self.log_length % MiB:
            raise CorruptImageError(f"log length {self.log_length} is not a non-zero multiple of 1 MiB",
                                    field="Header.LogLength", reason=Reason.CORRUPT_HEADER)
        if self.log_offset % ALIGNMENT or self.log_offset < HEADER_SECTION_SIZE:
            raise CorruptImageError(f"log offset {self.log_offset} is not 1 MiB aligned after the header "
                                    "section", field="Header.LogOffset", reason=Reason.CORRUPT_HEADER)
        # Even an empty log must lie in the file: the first logged update of a writable open writes there
        # (an offset of 2**63 would reach the host as an OverflowError, a smaller one grow the file wildly).
        if self.log_offset + self.log_length > file_size:
            raise CorruptImageError(f"log ({self.log_offset}+{self.log_length}) lies past the end of the "
                                    f"file ({file_size} bytes)", field="Header.LogOffset", reason=Reason.CORRUPT_HEADER)


def current_header(first: bytes, second: bytes) -> tuple[int, Header]:
    """Pick the current header (2.2.2): the only valid one, or the valid one with the higher sequence."""
    headers = [Header.decode(first), Header.decode(second)]
    valid = [(i, h) for i, h in enumerate(headers) if h is not None]
    if not valid:
        raise CorruptImageError("neither header is valid (bad signature or checksum)", field="Header",
                                reason=Reason.CORRUPT_HEADER)
    if len(valid) == 2 and valid[0][1].sequence_number == valid[1][1].sequence_number:
        if valid[0][1] != valid[1][1]:
            raise CorruptImageError("both headers have the same sequence number but differ",
                                    field="Header.SequenceNumber", reason=Reason.CORRUPT_HEADER)
    return max(valid, key=lambda item: item[1].sequence_number)
