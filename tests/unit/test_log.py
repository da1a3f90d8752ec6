"""Log entries and the active-sequence search (spec 2.3.3) on crafted logs."""

from __future__ import annotations

import os
import uuid

from vhdxfs.format.log import (
    DataDescriptor,
    ZeroDescriptor,
    decode_entry,
    encode_entry,
    find_active_sequence,
)

GUID = uuid.uuid4()
LOG = 64 * 1024
MiB = 1 << 20


def entry(seq: int, tail: int, writes=(), zeros=(), guid=GUID) -> bytes:
    return encode_entry(sequence_number=seq, tail=tail, log_guid=guid, flushed_file_offset=4 * MiB,
                        last_file_offset=4 * MiB, writes=list(writes), zeros=list(zeros))


def place(log: bytearray, position: int, raw: bytes) -> None:
    """Write ``raw`` into the ring at ``position``, wrapping."""
    for i, byte in enumerate(raw):
        log[(position + i) % len(log)] = byte


def test_entry_round_trip_restores_leading_and_trailing_bytes():
    sector = os.urandom(4096)
    raw = entry(3, 0, writes=[(2 * MiB, sector)], zeros=[(3 * MiB, 8192)])
    decoded = decode_entry(raw + bytes(LOG - len(raw)), 0, GUID)
    assert decoded.sequence_number == 3
    assert decoded.descriptors == (ZeroDescriptor(3 * MiB, 8192), DataDescriptor(2 * MiB, sector))


def test_damaged_or_foreign_entries_are_not_entries():
    raw = bytearray(entry(3, 0, writes=[(2 * MiB, os.urandom(4096))]))
    log = raw + bytes(LOG - len(raw))
    assert decode_entry(bytes(log), 0, uuid.uuid4()) is None  # stale GUID
    torn = bytearray(log)
    torn[4096 + 100] ^= 1  # a torn data sector
    assert decode_entry(bytes(torn), 0, GUID) is None


def test_a_single_entry_is_the_active_sequence():
    log = bytearray(LOG)
    place(log, 8192, entry(1, 8192, writes=[(2 * MiB, bytes(4096))]))
    assert [e.sequence_number for e in find_active_sequence(bytes(log), GUID)] == [1]


def test_a_sequence_replays_from_its_tail():
    log = bytearray(LOG)
    first = entry(5, 0, writes=[(2 * MiB, b"a" * 4096)])
    second = entry(6, 0, writes=[(2 * MiB, b"b" * 4096)])
    place(log, 0, first)
    place(log, len(first), second)
    assert [e.sequence_number for e in find_active_sequence(bytes(log), GUID)] == [5, 6]


def test_an_entry_that_wraps_around_the_end_of_the_log():
    log = bytearray(LOG)
    raw = entry(9, LOG - 4096, writes=[(2 * MiB, b"w" * 4096), (2 * MiB + 4096, b"x" * 4096)])
    place(log, LOG - 4096, raw)  # header at the very end, data sectors at the start
    found = find_active_sequence(bytes(log), GUID)
    assert [e.sequence_number for e in found] == [9]
    assert found[0].descriptors[1].data == b"x" * 4096


def test_a_torn_newest_entry_leaves_the_previous_sequence_active():
    log = bytearray(LOG)
    older = entry(1, 0, writes=[(2 * MiB, b"1" * 4096)])
    newer = bytearray(entry(2, len(older), writes=[(2 * MiB, b"2" * 4096)]))
    newer[-10] ^= 0xFF
    place(log, 0, older)
    place(log, len(older), bytes(newer))
    assert [e.sequence_number for e in find_active_sequence(bytes(log), GUID)] == [1]


def test_entries_of_another_log_guid_are_ignored():
    log = bytearray(LOG)
    place(log, 0, entry(50, 0, guid=uuid.uuid4()))
    place(log, 8192, entry(3, 8192))
    assert [e.sequence_number for e in find_active_sequence(bytes(log), GUID)] == [3]


def test_of_two_sequences_the_newer_wins():
    log = bytearray(LOG)
    place(log, 0, entry(10, 0))
    place(log, 32768, entry(4, 32768))
    assert [e.sequence_number for e in find_active_sequence(bytes(log), GUID)] == [10]


def test_a_head_whose_tail_is_outside_its_sequence_is_not_valid():
    log = bytearray(LOG)
    place(log, 0, entry(7, 20480))  # tail points at nothing of its sequence
    assert find_active_sequence(bytes(log), GUID) == []


def test_an_empty_log_has_no_sequence():
    assert find_active_sequence(bytes(LOG), GUID) == []


def test_the_log_writer_splits_big_commits_and_never_exceeds_half_the_log():
    from vhdxfs.engine import MemoryFile
    from vhdxfs.engine.image.headers import HeaderState
    from vhdxfs.engine.image.journal import LogWriter
    from vhdxfs.format.header import Header

    host = MemoryFile(bytes(8 * MiB))
    header = Header(sequence_number=1, file_write_guid=GUID, data_write_guid=GUID, log_guid=GUID,
                    log_length=MiB, log_offset=MiB)
    writer = LogWriter(host, HeaderState(host, header, 0, writable=True))
    pages = {4 * MiB + i * 4096: os.urandom(4096) for i in range(600)}
    writer.commit(pages, 8 * MiB)
    assert writer.entries_written >= 3
    log = host.pread(MiB, MiB)
    newest = find_active_sequence(log, GUID)
    assert len(newest) == 1 and newest[0].length <= MiB // 2
    for offset, page in pages.items():
        assert host.pread(offset, 4096) == page  # applied in place
    # Many small commits wrap the ring and the newest entry is always the one found.
    for i in range(300):
        writer.commit({5 * MiB: bytes([i % 256]) * 4096}, 8 * MiB)
    newest = find_active_sequence(host.pread(MiB, MiB), GUID)
    assert newest[-1].sequence_number == writer.sequence_number
    assert newest[-1].descriptors[0].data == bytes([299 % 256]) * 4096
    host.close()
