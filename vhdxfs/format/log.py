"""Log entries, zero and data descriptors, data sectors (2.3.1) and the active-sequence search (2.3.3).

Everything here works on bytes already read: the journal in the engine does the I/O. The log is a ring,
so an entry may wrap past the end of the log region; ``ring_slice`` hands out the unwrapped bytes.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CorruptImageError, Reason
from . import checksum
from .constants import (
    DATA_DESC_SIGNATURE,
    DATA_SECTOR_SIGNATURE,
    LOG_ENTRY_SIGNATURE,
    LOG_SECTOR_SIZE,
    ZERO_DESC_SIGNATURE,
    MiB,
)
from .guids import guid_from_bytes, guid_to_bytes

_ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")  # 64 bytes
_ZERO_DESC = struct.Struct("<4sIQQQ")  # 32 bytes
_DATA_DESC = struct.Struct("<4sIQQQ")  # 32 bytes: signature, trailing(4), leading(8), offset, sequence
_DESC_SIZE = 32
_CHECKSUM_AT = 4
DESCRIPTORS_PER_SECTOR = LOG_SECTOR_SIZE // _DESC_SIZE  # 128; the first sector holds 126 after the header


@dataclass(frozen=True)
class ZeroDescriptor:
    file_offset: int
    length: int


@dataclass(frozen=True)
class DataDescriptor:
    file_offset: int
    data: bytes  # the whole 4 KiB sector, leading and trailing bytes restored


@dataclass(frozen=True)
class LogEntry:
    position: int  # offset of the entry within the log
    length: int
    tail: int
    sequence_number: int
    log_guid: uuid.UUID
    flushed_file_offset: int
    last_file_offset: int
    descriptors: tuple[ZeroDescriptor | DataDescriptor, ...]


def descriptor_sectors(count: int) -> int:
    """4 KiB sectors needed for the header plus ``count`` descriptors."""
    return -(-(count + 2) // DESCRIPTORS_PER_SECTOR)


def entry_size(data_sectors: int, zero_descriptors: int = 0) -> int:
    return (descriptor_sectors(data_sectors + zero_descriptors) + data_sectors) * LOG_SECTOR_SIZE


def encode_entry(*, sequence_number: int, tail: int, log_guid: uuid.UUID, flushed_file_offset: int,
                 last_file_offset: int, writes: list[tuple[int, bytes]],
                 zeros: Sequence[tuple[int, int]] = ()) -> bytes:
    """Build one log entry: ``writes`` are (file offset, 4 KiB sector) pairs, ``zeros`` (offset, length)."""
    count = len(writes) + len(zeros)
    desc_sectors = descriptor_sectors(count)
    length = (desc_sectors + len(writes)) * LOG_SECTOR_SIZE
    buf = bytearray(length)
    _ENTRY_HEADER.pack_into(buf, 0, LOG_ENTRY_SIGNATURE, 0, length, tail, sequence_number, count, 0,
                            guid_to_bytes(log_guid), flushed_file_offset, last_file_offset)
    at = _ENTRY_HEADER.size
    for offset, zlen in zeros:
        _ZERO_DESC.pack_into(buf, at, ZERO_DESC_SIGNATURE, 0, zlen, offset, sequence_number)
        at += _DESC_SIZE
    data_at = desc_sectors * LOG_SECTOR_SIZE
    high, low = sequence_number >> 32, sequence_number & 0xFFFFFFFF
    for offset, sector in writes:
        if len(sector) != LOG_SECTOR_SIZE or offset % LOG_SECTOR_SIZE:
            raise ValueError("log writes are whole 4 KiB sectors at 4 KiB offsets")
        trailing = struct.unpack_from("<I", sector, LOG_SECTOR_SIZE - 4)[0]
        leading = struct.unpack_from("<Q", sector, 0)[0]
        _DATA_DESC.pack_into(buf, at, DATA_DESC_SIGNATURE, trailing, leading, offset, sequence_number)
        at += _DESC_SIZE
        struct.pack_into("<4sI", buf, data_at, DATA_SECTOR_SIGNATURE, high)
        buf[data_at + 8:data_at + LOG_SECTOR_SIZE - 4] = sector[8:LOG_SECTOR_SIZE - 4]
        struct.pack_into("<I", buf, data_at + LOG_SECTOR_SIZE - 4, low)
        data_at += LOG_SECTOR_SIZE
    checksum.seal(buf, _CHECKSUM_AT)
    return bytes(buf)


def ring_slice(log: bytes | memoryview, position: int, length: int) -> bytes:
    """``length`` bytes of the ring ``log`` from ``position``, wrapping at its end."""
    size = len(log)
    if length > size:
        raise CorruptImageError(f"entry of {length} bytes is larger than the log", field="LogEntry.EntryLength",
                                reason=Reason.CORRUPT_LOG)
    end = position + length
    if end <= size:
        return bytes(log[position:end])
    return bytes(log[position:]) + bytes(log[:end - size])


def decode_entry(log: bytes | memoryview, position: int, log_guid: uuid.UUID) -> LogEntry | None:
    """The valid entry at ``position`` of the ring, or None when there is none (any check fails)."""
    size = len(log)
    header = ring_slice(log, position, LOG_SECTOR_SIZE)
    (sig, _crc, length, tail, seq, count, _res, raw_guid, flushed, last) = _ENTRY_HEADER.unpack_from(header)
    if sig != LOG_ENTRY_SIGNATURE or guid_from_bytes(raw_guid) != log_guid:
        return None
    if length < LOG_SECTOR_SIZE or length % LOG_SECTOR_SIZE or length > size:
        return None
    if tail % LOG_SECTOR_SIZE or tail >= size or seq == 0 or flushed % MiB or last % MiB:
        return None
    desc_sectors = descriptor_sectors(count)
    if desc_sectors * LOG_SECTOR_SIZE > length:
        return None
    raw = ring_slice(log, position, length)
    if not checksum.verify(raw, _CHECKSUM_AT):
        return None
    descriptors: list[ZeroDescriptor | DataDescriptor] = []
    data_at = desc_sectors * LOG_SECTOR_SIZE
    high, low = seq >> 32, seq & 0xFFFFFFFF
    for i in range(count):
        at = _ENTRY_HEADER.size + i * _DESC_SIZE
        dsig = raw[at:at + 4]
        if dsig == ZERO_DESC_SIGNATURE:
            _s, _r, zlen, offset, dseq = _ZERO_DESC.unpack_from(raw, at)
            if dseq != seq or zlen % LOG_SECTOR_SIZE or offset % LOG_SECTOR_SIZE:
                return None
            descriptors.append(ZeroDescriptor(offset, zlen))
        elif dsig == DATA_DESC_SIGNATURE:
            _s, trailing, leading, offset, dseq = _DATA_DESC.unpack_from(raw, at)
            if dseq != seq or offset % LOG_SECTOR_SIZE or data_at + LOG_SECTOR_SIZE > length:
                return None
            dsig2, shigh = struct.unpack_from("<4sI", raw, data_at)
            slow = struct.unpack_from("<I", raw, data_at + LOG_SECTOR_SIZE - 4)[0]
            if dsig2 != DATA_SECTOR_SIGNATURE or shigh != high or slow != low:
                return None
            sector = (struct.pack("<Q", leading) + raw[data_at + 8:data_at + LOG_SECTOR_SIZE - 4]
                      + struct.pack("<I", trailing))
            descriptors.append(DataDescriptor(offset, sector))
            data_at += LOG_SECTOR_SIZE
        else:
            return None
    return LogEntry(position, length, tail, seq, log_guid, flushed, last, tuple(descriptors))


def find_active_sequence(log: bytes | memoryview, log_guid: uuid.UUID) -> list[LogEntry]:
    """The newest valid, complete log sequence (2.3.3), tail entry first; [] when there is none."""
    size = len(log)
    decoded: dict[int, LogEntry | None] = {}

    def entry_at(pos: int) -> LogEntry | None:
        if pos not in decoded:
            decoded[pos] = decode_entry(log, pos, log_guid)
        return decoded[pos]

    best: list[LogEntry] = []
    current_tail = old_tail = 0
    while True:
        # Step 2-3: grow a sequence from the current tail while entries are valid and consecutive.
        sequence: list[LogEntry] = []
        head, used = current_tail, 0
        while used < size:
            entry = entry_at(head)
            if entry is None or used + entry.length > size:
                break
            if sequence and entry.sequence_number != sequence[-1].sequence_number + 1:
                break
            sequence.append(entry)
            used += entry.length
            head = (head + entry.length) % size
        # Step 4-5: valid when the head entry's tail is the start of one of its entries.
        start = None
        if sequence:
            start = next((i for i, e in enumerate(sequence) if e.position == sequence[-1].tail), None)
        if start is not None and (not best or sequence[-1].sequence_number > best[-1].sequence_number):
            best = sequence[start:]
        # Step 6-7: move on; stop once the scan has wrapped.
        current_tail = head if start is not None else (current_tail + LOG_SECTOR_SIZE) % size
        if current_tail <= old_tail:
            break
        old_tail = current_tail
    return best
