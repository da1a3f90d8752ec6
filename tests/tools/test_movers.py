"""The offline data movers' parts (engine/ops): zero detection, the reader-thread mover, the pieces of a
source, compact's zero scan. What they find and skip must be exactly what a byte-by-byte model says, and
a failure on either side of the mover must stop both threads."""

from __future__ import annotations

import random
import threading

import pytest

from vhdxfs.engine import Kind, MemoryFile, PosixFile, no_progress
from vhdxfs.engine.ops.compact import reads_as_zeros
from vhdxfs.engine.ops.hostfile import data_ranges
from vhdxfs.engine.ops.mover import move
from vhdxfs.engine.ops.sources import Piece, RawSource, split
from vhdxfs.engine.ops.zeroscan import ZERO_SPAN, data_runs, is_zero

KiB, MiB = 1 << 10, 1 << 20


def model_runs(data: bytes, offset: int, sparse: int) -> list[tuple[int, int]]:
    """data_runs, byte by byte: the aligned pieces of ``sparse`` bytes that are all zeros are left out."""
    if sparse == 0:
        return [(0, len(data))] if data else []
    keep = []
    pos = 0
    while pos < len(data):
        end = min(len(data), (offset + pos) // sparse * sparse + sparse - offset)
        if any(data[pos:end]):
            keep.append((pos, end))
        pos = end
    merged: list[tuple[int, int]] = []
    for start, end in keep:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def patterned(rnd: random.Random, n: int) -> bytearray:
    """Random bytes with zero stretches of every length, a lone non-zero byte in some of them."""
    buf = bytearray(rnd.randbytes(n))
    for _ in range(rnd.randrange(1, 12)):
        start = rnd.randrange(n)
        length = rnd.choice([1, 511, 512, 4095, 4096, 4097, 9000, 65536, 200_000])
        buf[start:start + length] = bytes(min(length, n - start))
        if rnd.random() < 0.3:
            buf[min(n - 1, start + rnd.randrange(length))] = 7
    return buf


@pytest.mark.parametrize("sparse", [0, 512, 4096, 65536, 3 * 512])
def test_data_runs_leave_out_exactly_the_aligned_zero_pieces(sparse):
    rnd = random.Random(sparse)
    for _ in range(60):
        n = rnd.choice([1, 4096, 70_000, 1 * MiB, 1 * MiB + 512])
        offset = rnd.choice([0, 512, 4096 - 512, 12345 * 512, 1 << 30])
        data = patterned(rnd, n) if rnd.random() < 0.8 else bytearray(n)
        assert data_runs(memoryview(data), offset, sparse) == model_runs(bytes(data), offset, sparse)


def test_is_zero_stops_at_nothing_but_zeros_also_past_one_comparison():
    big = bytearray(ZERO_SPAN + 5 * MiB)
    assert is_zero(memoryview(big)) and is_zero(b"") and is_zero(bytes(100))
    big[-1] = 1
    assert not is_zero(memoryview(big))
    big[-1], big[ZERO_SPAN] = 0, 1
    assert not is_zero(memoryview(big))
    assert not is_zero(b"\0" * 4095 + b"\1")


def test_pieces_end_on_multiples_of_the_chunk_and_follow_the_file():
    pieces = list(split(3 * MiB - 512, 6 * MiB, 4 * MiB, lambda at, view: None, 100))
    assert [(p.offset, p.length, p.at) for p in pieces] == [
        (3 * MiB - 512, MiB + 512, 100), (4 * MiB, 4 * MiB, 100 + MiB + 512), (8 * MiB, MiB - 512, 100 + 5 * MiB + 512)]


def test_a_raw_source_is_read_where_it_holds_data(tmp_path):
    path = tmp_path / "s.raw"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(10 * MiB)
        f.write(b"x" * MiB)
        f.seek(40 * MiB + 4096)
        f.write(b"y")
    source = RawSource(path)
    try:
        covered = [(p.offset, p.offset + p.length) for p in source.pieces(4 * MiB)]
    finally:
        source.close()
    assert all(a % (4 * MiB) + (b - a) <= 4 * MiB for a, b in covered)
    assert sum(b - a for a, b in covered) <= 2 * MiB  # the holes were skipped (ext4: 4 KiB blocks)

    def covers(start, end):
        return sum(min(b, end) - max(a, start) for a, b in covered if a < end and b > start) == end - start

    assert covers(10 * MiB, 11 * MiB) and covers(40 * MiB + 4096, 40 * MiB + 4097)


def test_data_ranges_of_a_host_that_cannot_tell_is_everything():
    assert list(data_ranges(MemoryFile(bytes(10)), 3, 100)) == [(3, 100)]


def pieces_of(data: bytes, chunk: int, stop_at: int | None = None):
    """DATA pieces of a buffer; reading the one at ``stop_at`` fails."""
    def read(at, view):
        if at == stop_at:
            raise OSError(5, "Input/output error")
        view[:] = data[at:at + len(view)]
    for offset in range(0, len(data), chunk):
        yield Piece(offset, min(chunk, len(data) - offset), Kind.DATA, read, offset)


def no_reader_left():
    return not [t for t in threading.enumerate() if t.name == "vhdxfs-read-ahead"]


def test_move_writes_the_data_runs_in_order_and_reports_every_byte():
    rnd = random.Random(3)
    data = bytes(patterned(rnd, 9 * MiB + 4096))
    out = bytearray(len(data) + MiB)
    order = []

    def write(offset, view):
        order.append(offset)
        out[offset:offset + len(view)] = view

    done = []

    class Bar:
        def update(self, n):
            done.append(n)

    moved = move(pieces_of(data, MiB), write, total=len(out), bar=Bar(), sparse=4096, chunk=MiB)
    assert out[:len(data)] == data and order == sorted(order)
    assert moved.written == sum(e - s for s, e in model_runs(data, 0, 4096))
    assert moved.written + moved.skipped == len(data)
    assert sum(done) == len(out)
    assert no_reader_left()


def test_a_failing_write_stops_the_reader_and_is_raised():
    data = bytes([1]) * (40 * MiB)
    calls = []

    def write(offset, view):
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        move(pieces_of(data, MiB), write, total=len(data), bar=no_progress(0, "").__enter__(), chunk=MiB)
    assert no_reader_left() and len(calls) == 3


def test_a_failing_read_is_raised_in_the_caller_after_the_pieces_before_it():
    data = bytes([2]) * (8 * MiB)
    written = []
    with pytest.raises(OSError, match="Input/output"):
        move(pieces_of(data, MiB, stop_at=5 * MiB), lambda offset, view: written.append(offset),
             total=len(data), bar=no_progress(0, "").__enter__(), chunk=MiB)
    assert written == [i * MiB for i in range(5)]
    assert no_reader_left()


def test_an_interrupt_in_the_writer_stops_the_reader():
    data = bytes([3]) * (32 * MiB)

    def write(offset, view):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        move(pieces_of(data, MiB), write, total=len(data), bar=no_progress(0, "").__enter__(), chunk=MiB)
    assert no_reader_left()


def test_zero_pieces_go_to_the_zero_target_in_order():
    seen = []
    pieces = [Piece(0, MiB, Kind.DATA, lambda at, view: view.__setitem__(slice(None), bytes([9]) * len(view)), 0),
              Piece(MiB, 2 * MiB, Kind.ZERO), Piece(3 * MiB, 512, Kind.DATA, lambda at, view: None, 0)]
    moved = move(pieces, lambda o, v: seen.append(("w", o, len(v))), zero=lambda o, n: seen.append(("z", o, n)),
                 total=4 * MiB, bar=no_progress(0, "").__enter__())
    assert seen == [("w", 0, MiB), ("z", MiB, 2 * MiB), ("w", 3 * MiB, 512)]
    assert (moved.written, moved.zeroed) == (MiB + 512, 2 * MiB)


@pytest.mark.parametrize("posix", [True, False], ids=["os-file", "memory"])
def test_compacts_zero_scan_tells_zeros_from_data_anywhere_in_a_block(tmp_path, posix):
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(20 * MiB)
        f.write(bytes(4 * MiB))  # written zeros: read and compared
        f.seek(40 * MiB - 1)
        f.write(b"\1")  # the last byte of a block
        f.seek(48 * MiB + 70 * KiB)
        f.write(b"\1")  # past the first, small piece
    host = PosixFile(path, writable=False, lock=False) if posix else MemoryFile(path.read_bytes())
    buf = bytearray(4 * MiB)
    try:
        assert reads_as_zeros(host, 0, 16 * MiB, buf)
        assert reads_as_zeros(host, 16 * MiB, 16 * MiB, buf)
        assert not reads_as_zeros(host, 32 * MiB, 8 * MiB, buf)
        assert reads_as_zeros(host, 32 * MiB, 8 * MiB - 1, buf)
        assert not reads_as_zeros(host, 48 * MiB, 16 * MiB, buf)
    finally:
        host.close()
