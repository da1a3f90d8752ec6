"""`vhdxfs resize`: QEMU sees the new size, checks the image clean, and the data is the same."""

from __future__ import annotations

import json
import random

import pytest
import trio

from tests.crash.powercut import Disk, PowerCut, PowerCutHost
from tests.helpers import make_image, need_tools, on_disk, qemu_check_clean, run, sha256, vhdxfs
from vhdxfs.engine import check_image, create_child, resize
from vhdxfs.engine.aio import AsyncDisk
from vhdxfs.engine.image import VhdxFile
from vhdxfs.format import guids

MiB = 1 << 20
GiB = 1 << 30


def qemu_size(path) -> int:
    result = run("qemu-img", "info", "--output=json", "-f", "vhdx", path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["virtual-size"]


def bat_region(path):
    image = VhdxFile.open(path, read_only=True)
    try:
        return image.regions.find(guids.BAT_REGION)
    finally:
        image.close()


def test_growing_past_the_bat_region_moves_the_bat_and_keeps_the_data(tmp_path):
    need_tools("qemu-img", "qemu-io")
    image = tmp_path / "q.vhdx"
    # QEMU's layout puts the metadata region right after a 1 MiB BAT: growth must move the BAT.
    assert run("qemu-img", "create", "-f", "vhdx", "-o", "block_size=1M", image, "64M").returncode == 0
    assert run("qemu-io", "-f", "vhdx", "-c", "write -P 0x33 0 3M", "-c", "write -P 0x44 61M 3M",
               image).returncode == 0
    before = tmp_path / "before.raw"
    assert run("qemu-img", "convert", "-O", "raw", image, before).returncode == 0
    old_bat = bat_region(image)
    result = vhdxfs("resize", image, "200G")
    assert result.returncode == 0, result.stderr
    assert "BAT moved" in result.stdout
    assert qemu_size(image) == 200 * GiB
    new_bat = bat_region(image)
    assert new_bat.file_offset != old_bat.file_offset and new_bat.length >= 2 * MiB
    qemu_check_clean(image)
    assert vhdxfs("check", image).returncode == 0
    # QEMU reads the old data, zeros after it, and writes into the new space; we read what it read before.
    io = run("qemu-io", "-f", "vhdx", "-c", "read -P 0x33 0 3M", "-c", "read -P 0 3M 58M", "-c", "read -P 0x44 61M 3M",
             "-c", "read -P 0 64M 64M", "-c", "write -P 0x55 150G 2M", "-c", "read -P 0x55 150G 2M", image)
    assert io.returncode == 0 and "verification failed" not in io.stdout, io.stdout

    async def ours() -> bytes:
        async with await AsyncDisk.open(image, read_only=True) as disk:
            return bytes(await disk.read(0, 64 * MiB))

    assert trio.run(ours) == before.read_bytes()
    qemu_check_clean(image)


async def test_growing_in_place_and_a_fixed_image(tmp_path):
    need_tools("qemu-img")
    for kind in ("dynamic", "fixed"):
        path = make_image(tmp_path / f"{kind}.vhdx", 10 * MiB + 512, block_size=1 * MiB, disk_type=kind)
        data = random.Random(kind).randbytes(10 * MiB + 512)
        async with await AsyncDisk.open(path) as disk:
            await disk.write(0, data)
        bat_before = bat_region(path)
        assert resize(path, 40 * MiB).new_size == 40 * MiB
        assert bat_region(path) == bat_before  # room enough: the BAT stays where it was
        assert qemu_size(path) == 40 * MiB
        qemu_check_clean(path)
        async with await AsyncDisk.open(path, read_only=True) as disk:
            assert await disk.read(0, len(data)) == data
            assert await disk.read(len(data), 40 * MiB - len(data)) == bytes(40 * MiB - len(data))
            if kind == "fixed":  # LeaveBlockAllocated: the new blocks are allocated too
                assert len(on_disk(path).bat.allocated_ranges()) == 40


async def test_shrinking_needs_the_flag_and_an_empty_tail(tmp_path):
    need_tools("qemu-img")
    path = make_image(tmp_path / "s.vhdx", 64 * MiB, block_size=1 * MiB)
    head = random.Random(1).randbytes(20 * MiB)
    async with await AsyncDisk.open(path) as disk:
        await disk.write(0, head)
        await disk.write(40 * MiB, b"\x01" * 512)
    digest = sha256(path)

    result = vhdxfs("resize", path, "32M")
    assert result.returncode == 1 and "--shrink" in result.stderr and result.stderr.count("\n") == 1
    result = vhdxfs("resize", path, "32M", "--shrink")
    assert result.returncode == 1 and f"virtual offset {40 * MiB}" in result.stderr, result.stderr
    result = vhdxfs("resize", path, "1000", "--shrink")
    assert result.returncode == 1 and "multiple of the logical sector size" in result.stderr
    assert sha256(path) == digest  # a refused resize writes nothing

    async with await AsyncDisk.open(path) as disk:
        await disk.discard(40 * MiB, MiB)
    result = vhdxfs("resize", path, "32M", "--shrink")
    assert result.returncode == 0, result.stderr
    assert qemu_size(path) == 32 * MiB
    qemu_check_clean(path)
    async with await AsyncDisk.open(path, read_only=True) as disk:
        assert disk.size == 32 * MiB
        assert await disk.read(0, len(head)) == head
    # Shrinking into a block is fine when what is cut off reads as zeros, and refused when it does not.
    assert resize(path, 20 * MiB + 4096, shrink=True).new_size == 20 * MiB + 4096
    async with await AsyncDisk.open(path) as disk:
        await disk.write(20 * MiB + 2048, b"\x02" * 512)
    result = vhdxfs("resize", path, str(20 * MiB + 1024), "--shrink")
    assert result.returncode == 1 and f"virtual offset {20 * MiB + 2048}" in result.stderr, result.stderr


def test_a_differencing_image_is_not_resized(tmp_path):
    base = make_image(tmp_path / "base.vhdx", 16 * MiB)
    child = tmp_path / "child.avhdx"
    create_child(child, base)
    result = vhdxfs("resize", child, "32M")
    assert result.returncode == 1
    assert "parent's size" in result.stderr and result.stderr.startswith(f"vhdxfs: {child}: ")


@pytest.mark.parametrize("grow_to", [40 * MiB, 200 * GiB], ids=["in-place", "relocated"])
async def test_a_power_cut_anywhere_leaves_the_old_or_the_new_size(tmp_path, grow_to):
    """Every operation of a resize is a possible cut point; each survivor opens clean with the data kept."""
    need_tools("qemu-img")
    path = make_image(tmp_path / "p.vhdx", 8 * MiB, block_size=1 * MiB)
    data = random.Random(3).randbytes(8 * MiB)
    async with await AsyncDisk.open(path) as disk:
        await disk.write(0, data)
    original = path.read_bytes()

    def run_to(cut_at, seed):
        medium = Disk(original, cut_at, random.Random(seed))
        try:
            resize(path, grow_to, host_factory=lambda p, writable: PowerCutHost(p, writable=writable, disk=medium))
        except PowerCut:
            pass
        return medium

    total = run_to(None, 0).ops
    assert total > 10
    sizes = set()
    for cut in range(1, total + 1):
        path.write_bytes(run_to(cut, cut).survivor())
        async with await AsyncDisk.open(path) as disk:  # replays the log, as any writable open
            sizes.add(disk.size)
            assert await disk.read(0, len(data)) == data, f"cut at {cut}"
            if disk.size > len(data):
                assert await disk.read(len(data), MiB) == bytes(MiB)
        report = await trio.to_thread.run_sync(check_image, str(path))
        assert report["status"] == "clean", (cut, report)
        assert run("qemu-img", "check", "-f", "vhdx", path).returncode == 0, f"cut at {cut}"
    assert sizes == {8 * MiB, grow_to}
