"""CRC-32C checksums with the checksum field taken as zero (headers, region tables, log entries)."""

from __future__ import annotations

import struct

import crc32c as _crc32c


def checksum_with_zeroed_field(data: bytes | bytearray | memoryview, field_offset: int) -> int:
    """CRC-32C of ``data`` as if its 4-byte checksum field at ``field_offset`` were zero."""
    view = memoryview(data)
    crc = _crc32c.crc32c(view[:field_offset])
    crc = _crc32c.crc32c(b"\0\0\0\0", crc)
    return _crc32c.crc32c(view[field_offset + 4:], crc)


def stored_checksum(data: bytes | bytearray | memoryview, field_offset: int) -> int:
    return struct.unpack_from("<I", data, field_offset)[0]


def seal(buf: bytearray, field_offset: int) -> None:
    """Write the checksum of ``buf`` into its checksum field (in place)."""
    struct.pack_into("<I", buf, field_offset, 0)
    struct.pack_into("<I", buf, field_offset, _crc32c.crc32c(buf))


def verify(data: bytes | bytearray | memoryview, field_offset: int) -> bool:
    return checksum_with_zeroed_field(data, field_offset) == stored_checksum(data, field_offset)
