"""Readable forms of the bugs the coverage-guided fuzzers found (the raw inputs are in tests/fuzz/crashes/)."""

from __future__ import annotations

import struct
from pathlib import Path

import crc32c
import pytest

from tests.helpers import make_image
from vhdxfs.engine import Disk, check_and_repair
from vhdxfs.errors import CorruptImageError

MiB = 1 << 20
HEADER2 = 128 << 10


def _set_log_offset(path: Path, offset: int) -> None:
    """Give header 2 a log at ``offset`` and a higher sequence number, so it is the current header."""
    buf = bytearray(path.read_bytes())
    seq1 = struct.unpack_from("<Q", buf, (64 << 10) + 8)[0]
    struct.pack_into("<Q", buf, HEADER2 + 8, seq1 + 1)
    struct.pack_into("<Q", buf, HEADER2 + 72, offset)
    struct.pack_into("<I", buf, HEADER2 + 4, 0)
    struct.pack_into("<I", buf, HEADER2 + 4, crc32c.crc32c(bytes(buf[HEADER2:HEADER2 + 4096])))
    path.write_bytes(buf)


@pytest.mark.parametrize("offset", [0xFF00000000000000, 1 << 40])
def test_an_empty_log_past_the_end_of_the_file_is_refused(tmp_path: Path, offset: int) -> None:
    """crashes/repair/log-offset-past-eof-clean-log: a clean log whose offset lay past the file's end was
    accepted, and the first logged update (repair rewriting a region table, a writable open's flush) wrote
    there: an OverflowError from pwrite at 2**63, or a file grown to a TiB. Now the header is refused, and
    repair rewrites it from the other header (whose log lies in the file) without touching the data."""
    path = make_image(tmp_path / "a.vhdx", 4 * MiB, block_size=MiB)
    with Disk.open(path) as disk:
        disk.write(MiB, b"\x5a" * MiB)
    _set_log_offset(path, offset)
    size = path.stat().st_size
    with pytest.raises(CorruptImageError, match="past the end"):
        Disk.open(path)
    report = check_and_repair(path)
    assert report["status"] == "clean" and any("header 2 was damaged" in r for r in report["repairs"]), report
    assert path.stat().st_size == size
    with Disk.open(path, read_only=True) as disk:
        assert disk.read(MiB, MiB) == b"\x5a" * MiB and disk.read(0, MiB) == bytes(MiB)


def _set_sequence(path: Path, sequence: int, *, damage_header1: bool) -> None:
    """Give header 2 ``sequence`` (re-sealed), and optionally break header 1's checksum."""
    buf = bytearray(path.read_bytes())
    struct.pack_into("<Q", buf, HEADER2 + 8, sequence)
    struct.pack_into("<I", buf, HEADER2 + 4, 0)
    struct.pack_into("<I", buf, HEADER2 + 4, crc32c.crc32c(bytes(buf[HEADER2:HEADER2 + 4096])))
    if damage_header1:
        buf[(64 << 10) + 100] ^= 0xFF
    path.write_bytes(buf)


@pytest.mark.parametrize("sequence", [(1 << 64) - 1, (1 << 64) - 2])
def test_a_header_sequence_number_with_no_room_for_an_update_is_refused_before_any_write(
        tmp_path: Path, sequence: int) -> None:
    """crashes/repair/header-sequence-number-at-its-maximum: repairing a damaged header 1 next to a header 2
    whose SequenceNumber was 2**64-1 died with struct.error when the next header was encoded. An update
    writes two newer headers, so a number above 2**64-3 is now refused before anything is written: repair
    reports the image unrepairable and leaves it alone, a writable open refuses, a read-only one reads."""
    path = make_image(tmp_path / "a.vhdx", 4 * MiB, block_size=MiB)
    with Disk.open(path) as disk:
        disk.write(0, b"\x33" * MiB)
    _set_sequence(path, sequence, damage_header1=True)
    before = path.read_bytes()
    report = check_and_repair(path)
    assert report["status"] == "inconsistent" and "sequence number" in report["unrepairable"], report
    assert path.read_bytes() == before
    _set_sequence(path, sequence, damage_header1=False)
    before = path.read_bytes()
    with pytest.raises(CorruptImageError, match="sequence number"):
        Disk.open(path)
    assert path.read_bytes() == before
    with Disk.open(path, read_only=True) as disk:
        assert disk.read(0, MiB) == b"\x33" * MiB
