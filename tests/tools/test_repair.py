"""`vhdxfs check --repair`: damage is fixed and reported, data that was intact stays, QEMU agrees."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.helpers import make_dirty_image, make_image, need_tools, on_disk, qemu_check_clean, run, sha256, vhdxfs
from vhdxfs.engine import create_child
from vhdxfs.engine.aio import AsyncDisk
from vhdxfs.engine.image import VhdxFile
from vhdxfs.format.bat import PayloadState, make_entry
from vhdxfs.format.constants import HEADER_OFFSETS, HEADER_SIZE, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE
from vhdxfs.format.header import Header
from vhdxfs.format.region import RegionTable

MiB = 1 << 20


@pytest.fixture
def image(tmp_path) -> Path:
    """A QEMU-made image with data in blocks 0-3 (0x33) and 60-63 (0x44), 1 MiB blocks."""
    need_tools("qemu-img", "qemu-io")
    path = tmp_path / "q.vhdx"
    assert run("qemu-img", "create", "-f", "vhdx", "-o", "block_size=1M", path, "64M").returncode == 0
    assert run("qemu-io", "-f", "vhdx", "-c", "write -P 0x33 0 4M", "-c", "write -P 0x44 60M 4M",
               path).returncode == 0
    return path


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def bat_offset(path: Path) -> int:
    image = VhdxFile.open(path, read_only=True)
    try:
        return image.bat.region_offset
    finally:
        image.close()


def repair(path: Path) -> tuple[int, dict]:
    result = vhdxfs("check", "--repair", "--json", path)
    return result.returncode, json.loads(result.stdout)


def qemu_reads(path: Path, *patterns: str) -> None:
    args = [a for p in patterns for a in ("-c", f"read -P {p}")]
    result = run("qemu-io", "-f", "vhdx", *args, path)
    assert result.returncode == 0 and "verification failed" not in result.stdout, result.stdout + result.stderr


def test_a_bat_entry_past_the_end_of_the_file_becomes_zero(image):
    poke(image, bat_offset(image) + 8, struct.pack("<Q", make_entry(PayloadState.FULLY_PRESENT, 500 * MiB)))
    assert vhdxfs("check", image).returncode == 2
    assert run("qemu-img", "check", "-f", "vhdx", image).returncode != 0
    code, report = repair(image)
    assert code == 0, report
    assert report["status"] == "clean"
    assert len(report["repairs"]) == 1 and "BAT entry 1 " in report["repairs"][0] and "ZERO" in report["repairs"][0]
    qemu_check_clean(image)
    qemu_reads(image, "0x33 0 1M", "0 1M 1M", "0x33 2M 2M", "0x44 60M 4M")


def test_blocks_overlapping_structures_or_each_other_become_zero(image):
    at = bat_offset(image)
    first = struct.unpack("<Q", open(image, "rb").read()[at:at + 8])[0]
    poke(image, at + 5 * 8, struct.pack("<Q", first))  # block 5 claims block 0's space
    poke(image, at + 6 * 8, struct.pack("<Q", make_entry(PayloadState.FULLY_PRESENT, at)))  # inside the BAT
    code, report = repair(image)
    assert code == 0, report
    text = "\n".join(report["repairs"])
    assert "BAT entry 0 " in text and "BAT entry 5 " in text and "inside the BAT region" in text
    qemu_check_clean(image)
    qemu_reads(image, "0 0 1M", "0x33 1M 3M", "0 5M 2M", "0x44 60M 4M")


def test_a_damaged_header_is_rewritten_from_the_good_one(image):
    poke(image, HEADER_OFFSETS[0] + 100, b"garbage")
    assert "header 1 is damaged" in vhdxfs("check", image).stdout
    code, report = repair(image)
    assert code == 0 and any("header 1 was damaged" in r for r in report["repairs"]), report
    data = image.read_bytes()
    headers = [Header.decode(data[o:o + HEADER_SIZE]) for o in HEADER_OFFSETS]
    assert all(headers) and headers[0].data_write_guid == headers[1].data_write_guid
    assert report["warnings"] == []
    qemu_check_clean(image)
    qemu_reads(image, "0x33 0 4M", "0x44 60M 4M")


def headers_of(path: Path) -> tuple[list[Header], int]:
    """Both headers as they lie in the file (both must decode), and the slot of the newer one."""
    data = path.read_bytes()
    headers = [Header.decode(data[o:o + HEADER_SIZE]) for o in HEADER_OFFSETS]
    return headers, max(range(2), key=lambda i: headers[i].sequence_number)


def test_a_newer_header_whose_log_lies_past_the_end_is_rewritten_from_the_older_one(image):
    """Its checksum holds, so only its fields tell it is bad: repair falls back to the older header."""
    headers, newer = headers_of(image)
    bad = headers[newer].next(log_offset=1 << 40)
    poke(image, HEADER_OFFSETS[newer], bad.encode())
    assert vhdxfs("check", image).returncode == 2
    code, report = repair(image)
    assert code == 0 and report["status"] == "clean", report
    assert any(f"header {newer + 1} was damaged" in r for r in report["repairs"]), report
    rewritten, _ = headers_of(image)
    assert all(h.log_offset == headers[1 - newer].log_offset for h in rewritten)
    qemu_check_clean(image)
    qemu_reads(image, "0x33 0 4M", "0x44 60M 4M")


def test_a_header_of_a_newer_format_version_is_not_fallen_back_past(image):
    """Version 2 is not ours to downgrade: the image is reported and left as it was."""
    headers, newer = headers_of(image)
    poke(image, HEADER_OFFSETS[newer], headers[newer].next(version=2).encode())
    before = sha256(image)
    code, report = repair(image)
    assert code != 0 and any("format version 2" in e for e in report["errors"]), report
    assert sha256(image) == before


def test_a_damaged_region_table_copy_is_rewritten_from_the_good_one(image):
    poke(image, REGION_TABLE_OFFSETS[0] + 40, b"\xff" * 16)
    assert "region table copy 1 is damaged" in vhdxfs("check", image).stdout
    code, report = repair(image)
    assert code == 0 and any("region table copy 1" in r for r in report["repairs"]), report
    data = image.read_bytes()
    copies = [data[o:o + REGION_TABLE_SIZE] for o in REGION_TABLE_OFFSETS]
    assert copies[0] == copies[1] and RegionTable.decode(copies[0]) is not None
    qemu_check_clean(image)
    qemu_reads(image, "0x33 0 4M", "0x44 60M 4M")


def test_a_dirty_log_is_replayed(tmp_path):
    need_tools("qemu-img", "qemu-io")
    path = make_dirty_image(tmp_path / "d.vhdx", 16 * MiB, 3 * MiB, b"\x77" * MiB)
    assert "contains a log that needs to be replayed" in run("qemu-img", "check", "-f", "vhdx", path).stderr
    code, report = repair(path)
    assert code == 0 and any("replayed 1 log entries" in r for r in report["repairs"]), report
    qemu_check_clean(path)
    qemu_reads(path, "0x77 3M 1M", "0 0 3M")
    assert "log: clean" in vhdxfs("info", path).stdout


def test_a_clean_image_is_left_alone(image):
    digest = sha256(image)
    result = vhdxfs("check", "--repair", image)
    assert result.returncode == 0 and "Repaired" not in result.stdout, result.stdout
    assert sha256(image) == digest


def test_what_cannot_be_repaired_is_said_and_exits_2(image, tmp_path):
    for offset in HEADER_OFFSETS:
        poke(image, offset, b"junk")
    code, report = repair(image)
    assert code == 2 and report["unrepairable"].startswith("neither header is valid"), report
    other = tmp_path / "not.vhdx"
    other.write_bytes(b"hello" * 1000)
    result = vhdxfs("check", "--repair", other)
    assert result.returncode == 1 and result.stderr.startswith(f"vhdxfs: {other}: "), result.stderr


def test_region_tables_that_differ_are_made_equal(image):
    data = image.read_bytes()
    table = RegionTable.decode(data[REGION_TABLE_OFFSETS[1]:REGION_TABLE_OFFSETS[1] + REGION_TABLE_SIZE])
    # Copy 2 is valid but not the same table (its entries in another order): an open uses copy 1, so copy 2
    # is rewritten from it.
    poke(image, REGION_TABLE_OFFSETS[1], RegionTable(tuple(reversed(table.entries))).encode())
    assert vhdxfs("check", image).returncode == 2
    code, report = repair(image)
    assert code == 0, report
    data = image.read_bytes()
    assert data[REGION_TABLE_OFFSETS[0]:][:REGION_TABLE_SIZE] == data[REGION_TABLE_OFFSETS[1]:][:REGION_TABLE_SIZE]


async def test_a_damaged_sector_bitmap_entry_zeroes_its_partial_blocks(tmp_path):
    base = make_image(tmp_path / "base.vhdx", 8 * MiB, block_size=1 * MiB)
    async with await AsyncDisk.open(base) as disk:
        await disk.write(0, b"\x05" * (8 * MiB))
    child = tmp_path / "child.avhdx"
    create_child(child, base, block_size=1 * MiB)
    async with await AsyncDisk.open(child) as disk:
        await disk.write(512, b"\x06" * 512)  # block 0 PARTIALLY_PRESENT, chunk 0's bitmap PRESENT
        await disk.write(2 * MiB, b"\x07" * MiB)  # block 2 FULLY_PRESENT
        index = on_disk(child).geometry.bitmap_index(0)
    poke(child, bat_offset(child) + 8 * index, struct.pack("<Q", make_entry(6, 900 * MiB)))
    code, report = repair(child)
    assert code == 0, report
    text = "\n".join(report["repairs"])
    assert "sector bitmap of chunk 0" in text and "payload block 0," in text
    async with await AsyncDisk.open(child, read_only=True) as disk:
        assert await disk.read(0, MiB) == bytes(MiB)  # zeros: neither stale bits nor the parent
        assert await disk.read(MiB, MiB) == b"\x05" * MiB
        assert await disk.read(2 * MiB, MiB) == b"\x07" * MiB
