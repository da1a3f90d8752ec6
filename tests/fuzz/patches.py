"""A fuzz input as a seed image plus small patches, applied in memory and re-sealed.

Why: VHDX images are MiB large and guarded by CRC-32C, so raw-image fuzzing spends its time on copies and
stops at the first checksum. An input here is a few hundred bytes instead:

    byte 0          which seed (tests/fuzz/seeds.py NAMES, modulo the target's own list)
    then records    each starts with an opcode byte; op % 8 says what it does:
      0, 1  bytes:  structure, 2-byte offset within it, length (1-16), the bytes
      2, 3  int:    structure, 2-byte offset, a 1/2/4/8-byte little-endian value (op bits 3-4 give the
                    width), taken from INTERESTING (op bit 5 clear) or from the input (set)
      4     BAT:    entry index, state, file offset in MiB (op bit 3: set reserved bits too)
      5     log:    a whole new log entry written into the log, LogGuid set in both headers (log_entry)
      6     size:   the file shortened by 4 KiB sectors, or grown by MiB
      7     seal:   (op >> 3) % 3: leave a structure's checksum broken / copy header 1 over header 2 /
                    copy region table 1 over copy 2

Offsets address a structure (the ``spans`` of the seed), not the file, so every patch lands somewhere
meaningful. Afterwards the headers, region tables and log entries that were touched get a correct CRC-32C
again (unless a seal record said not to), as tests/fuzz/test_mutations.py does for its hypothesis cases.
"""

from __future__ import annotations

import functools
import struct
import uuid

import crc32c

from vhdxfs.format import log as logfmt
from vhdxfs.format.bat import Geometry

from .seeds import Seed

KiB, MiB = 1 << 10, 1 << 20
HEADERS = (64 * KiB, 128 * KiB)
REGIONS = (192 * KiB, 256 * KiB)
MAX_RECORDS = 24
INTERESTING = [0, 1, 2, 3, 6, 7, 8, 511, 512, 4095, 4096, 4097, MiB - 1, MiB, MiB + 1, 2 * MiB, 2047, 2048,
               0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, 64 << 40,
               (64 << 40) + 512, 128 << 40, 1 << 62, 1 << 63, (1 << 64) - 1]
FALLBACK_GUID = uuid.UUID("5eed5eed-0000-4000-8000-00000000f022")


class Reader:
    """Bytes of the input, taken from the front; past the end everything reads as zero."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def more(self) -> bool:
        return self.at < len(self.data)

    def take(self, n: int) -> bytes:
        out = self.data[self.at:self.at + n]
        self.at += n
        return out.ljust(n, b"\0")

    def int(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")


@functools.cache
def spans(seed: Seed) -> tuple[tuple[str, int, int], ...]:
    """(name, offset, length) of each structure of ``seed``, sized to what it really holds."""
    data = seed.data
    out = [("identifier", 0, 1024), ("header1", HEADERS[0], 96), ("header2", HEADERS[1], 96)]
    count = struct.unpack_from("<I", data, REGIONS[0] + 8)[0]
    for i, at in enumerate(REGIONS):
        out.append((f"region{i + 1}", at, 16 + 32 * (count + 1)))
    log_length, log_offset = struct.unpack_from("<IQ", data, HEADERS[0] + 68)
    used = _log_used(data[log_offset:log_offset + log_length])
    out.append(("log", log_offset, max(used, 4096)))
    for i in range(count):
        guid, offset, length, _ = struct.unpack_from("<16sQII", data, REGIONS[0] + 16 + 32 * i)
        if guid[:4] == bytes.fromhex("6677c22d"):  # the BAT region
            out.append(("bat", offset, min(length, 4096)))
        else:
            entries = struct.unpack_from("<H", data, offset + 10)[0]
            out.append(("metadata table", offset, 32 + 32 * (entries + 1)))
            end = max((o + n for o, n in _items(data, offset, entries)), default=64 * KiB + 64)
            out.append(("metadata items", offset + 64 * KiB, end - 64 * KiB))
            out.extend(("parent locator", offset + o, n) for o, n in _items(data, offset, entries)[5:])
    out.append(("file", 0, len(data)))
    return tuple(out)


def _items(data: bytes, table: int, count: int) -> list[tuple[int, int]]:
    return [struct.unpack_from("<II", data, table + 32 + 32 * i + 16) for i in range(count)]


def _log_used(log: bytes) -> int:
    """Bytes of the log holding entries (to the end of the last one that starts with 'loge')."""
    used = 0
    for at in range(0, len(log), 4096):
        if log[at:at + 4] == b"loge":
            used = max(used, at + struct.unpack_from("<I", log, at + 8)[0])
    return min(used, len(log))


class Scratch(bytearray):
    """A seed's bytes, patched: reused from input to input, and put back by undoing only what the last
    input changed (``dirty``), since copying MiBs per execution would cost more than the target itself."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.dirty: list[tuple[int, int]] = []

    def put(self, at: int, value: bytes | bytearray) -> None:
        """Overwrite bytes from ``at``; what would lie past the end (a shortened file) is left out."""
        value = value[:max(0, len(self) - at)]
        self[at:at + len(value)] = value
        self.dirty.append((at, at + len(value)))

    def restore(self, data: bytes) -> None:
        if len(self) != len(data):
            self[:] = data
        else:
            for lo, hi in self.dirty:
                self[lo:hi] = data[lo:hi]
        self.dirty.clear()


def _seal(buf: Scratch, offset: int, length: int) -> None:
    if offset + length > len(buf):
        return  # the file was cut short inside the structure: nothing to seal
    buf.dirty.append((offset + 4, offset + 8))
    struct.pack_into("<I", buf, offset + 4, 0)
    struct.pack_into("<I", buf, offset + 4, crc32c.crc32c(memoryview(buf)[offset:offset + length]))


def reseal(buf: Scratch, names: set[str], seed: Seed) -> None:
    """Give the touched checksummed structures a valid CRC again (log entries: every entry in the log)."""
    for name, at in (("header1", HEADERS[0]), ("header2", HEADERS[1])):
        if name in names:
            _seal(buf, at, 4 * KiB)
    for name, at in (("region1", REGIONS[0]), ("region2", REGIONS[1])):
        if name in names:
            _seal(buf, at, 64 * KiB)
    if "log" in names:
        log_length, log_offset = struct.unpack_from("<IQ", seed.data, HEADERS[0] + 68)
        for at in range(log_offset, min(log_offset + log_length, len(buf)), 4096):
            if buf[at:at + 4] == b"loge":
                length = struct.unpack_from("<I", buf, at + 8)[0]
                if 0 < length <= log_length and at + length <= min(log_offset + log_length, len(buf)):
                    _seal(buf, at, length)


def log_entry(buf: Scratch, seed: Seed, r: Reader) -> None:
    """Write a valid log entry built from the input (descriptors anywhere, any sizes) into the log."""
    log_length, log_offset = struct.unpack_from("<IQ", seed.data, HEADERS[0] + 68)
    guid_raw = bytes(buf[HEADERS[0] + 48:HEADERS[0] + 64])
    guid = uuid.UUID(bytes_le=guid_raw) if any(guid_raw) else FALLBACK_GUID
    position = r.int(1) % max(1, log_length // 4096) * 4096
    sequence, tail = r.int(1) + 1, r.int(1) % max(1, log_length // 4096) * 4096
    writes, zeros = [], []
    for _ in range(r.int(1) % 5):
        kind, offset = r.int(1), r.int(3) * 4096
        if kind & 1:
            zeros.append((offset, (r.int(2) % 600 + 1) * 4096))
        else:
            writes.append((offset, bytes([r.int(1)]) * 4096))
    entry = logfmt.encode_entry(sequence_number=sequence, tail=tail if r.int(1) & 1 else position,
                                log_guid=guid, flushed_file_offset=r.int(1) * MiB, last_file_offset=r.int(1) * MiB,
                                writes=writes, zeros=zeros)
    if position + len(entry) <= log_length and log_offset + position + len(entry) <= len(buf):
        buf.put(log_offset + position, entry)
    for at in HEADERS:
        buf.put(at + 48, guid.bytes_le)


def _bat_entry(buf: Scratch, seed: Seed, r: Reader, op: int) -> None:
    bat = next((s for s in spans(seed) if s[0] == "bat"), None)
    if bat is None:
        return
    index = r.int(2) % max(1, _entries(seed))
    state, mib = r.int(1) % 8, r.int(1) % (len(buf) // MiB + 4)
    value = mib << 20 | state | ((r.int(2) << 3) & 0xFFFF8 if op & 8 else 0)
    if bat[1] + 8 * index + 8 <= len(buf):
        buf.put(bat[1] + 8 * index, struct.pack("<Q", value))


@functools.cache
def _entries(seed: Seed) -> int:
    from vhdxfs.engine import MemoryFile
    from vhdxfs.engine.image import VhdxFile

    image = VhdxFile.open(seed.path, read_only=True, lenient=True,
                          host_factory=lambda p, writable: MemoryFile(seed.data, path=p, writable=False))
    m = image.metadata
    return Geometry(m.virtual_size, m.block_size, m.logical_sector_size, m.has_parent).total_entries


_SCRATCH: dict[str, Scratch] = {}


def apply(seed: Seed, r: Reader) -> Scratch:
    """The seed's bytes with every record of the input applied, checksums re-sealed: the seed's scratch
    buffer, valid until the next call for the same seed."""
    buf = _SCRATCH.get(seed.name)
    if buf is None:
        buf = _SCRATCH[seed.name] = Scratch(seed.data)
    buf.restore(seed.data)
    table = spans(seed)
    touched: set[str] = set()
    broken: set[str] = set()
    for _ in range(MAX_RECORDS):
        if not r.more():
            break
        op = r.int(1)
        kind = op % 8
        if kind in (0, 1, 2, 3):
            name, base, length = table[r.int(1) % len(table)]
            at = base + r.int(2) % max(1, length)
            if kind < 2:
                value = r.take(r.int(1) % 16 + 1)
            else:
                width = (1, 2, 4, 8)[(op >> 3) & 3]
                number = r.int(width) if op & 32 else INTERESTING[r.int(1) % len(INTERESTING)]
                value = (number % (1 << 8 * width)).to_bytes(width, "little")
            buf.put(at, value)
            touched.add(name)
        elif kind == 4:
            _bat_entry(buf, seed, r, op)
        elif kind == 5:
            log_entry(buf, seed, r)
            touched.update(("log", "header1", "header2"))
        elif kind == 6:
            amount = r.int(1)
            if op & 8:
                del buf[max(0, len(buf) - amount * 4096):]
            else:
                buf.extend(bytes(amount % 8 * MiB))
        else:
            choice = (op >> 3) % 3
            if choice == 0:
                broken.add(table[r.int(1) % len(table)][0])
            elif choice == 1:
                buf.put(HEADERS[1], buf[HEADERS[0]:HEADERS[0] + 4 * KiB])
            else:
                buf.put(REGIONS[1], buf[REGIONS[0]:REGIONS[0] + 64 * KiB])
    reseal(buf, touched - broken, seed)
    return buf
