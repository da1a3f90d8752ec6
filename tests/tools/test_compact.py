"""`vhdxfs compact`: all-zero blocks stop taking space; the contents stay the same for QEMU too."""

from __future__ import annotations

import os
import random

import trio

from tests.crash.powercut import Disk, PowerCut, PowerCutHost
from tests.helpers import make_image, need_tools, on_disk, qemu_check_clean, run, vhdxfs
from vhdxfs.engine import check_image, compact
from vhdxfs.engine.aio import AsyncDisk
from vhdxfs.engine.ops.compact import move_tail_blocks  # pass 2 alone: a test seam

MiB = 1 << 20


def test_zero_blocks_give_their_space_back_and_contents_stay(tmp_path):
    need_tools("qemu-img", "qemu-io")
    image = tmp_path / "c.vhdx"
    assert run("qemu-img", "create", "-f", "vhdx", "-o", "block_size=1M", image, "64M").returncode == 0
    cmds = ["-c", "write -P 0x33 0 4M", "-c", "write -z 1M 2M", "-c", "write -P 0 10M 3M",
            "-c", "write -P 0x44 20M 512"]
    assert run("qemu-io", "-f", "vhdx", *cmds, image).returncode == 0
    before = tmp_path / "before.raw"
    assert run("qemu-img", "convert", "-O", "raw", image, before).returncode == 0
    used = image.stat().st_blocks * 512
    result = vhdxfs("compact", image)
    assert result.returncode == 0, result.stderr
    assert "given back" in result.stdout
    assert image.stat().st_blocks * 512 <= used - 3 * MiB  # the 3 all-zero blocks at 10M
    qemu_check_clean(image)
    compare = run("qemu-img", "compare", "-f", "raw", "-F", "vhdx", before, image)
    assert compare.returncode == 0, compare.stdout
    assert vhdxfs("check", image).returncode == 0


def test_compacting_a_child_keeps_its_zeros_from_showing_the_parent(tmp_path):
    base, child = tmp_path / "base.vhdx", tmp_path / "child.avhdx"
    assert vhdxfs("create", base, "--size", "16M", "--block-size", "1M").returncode == 0
    raw = tmp_path / "ones.raw"
    raw.write_bytes(b"\x01" * (16 * MiB))
    base.unlink()
    assert vhdxfs("convert", raw, base, "--block-size", "1M").returncode == 0
    assert vhdxfs("create", child, "--parent", base, "--block-size", "1M").returncode == 0
    async def zero_a_block():
        async with await AsyncDisk.open(child) as disk:
            await disk.write(2 * MiB, bytes(MiB))

    trio.run(zero_a_block)
    assert vhdxfs("compact", child).returncode == 0
    merged = tmp_path / "merged.raw"
    assert vhdxfs("convert", child, merged).returncode == 0
    data = merged.read_bytes()
    assert data[2 * MiB:3 * MiB] == bytes(MiB) and data[:2 * MiB] == b"\x01" * (2 * MiB)
    assert os.path.getsize(merged) == 16 * MiB


async def test_tail_blocks_move_into_holes_and_the_file_gets_shorter(tmp_path):
    need_tools("qemu-img")
    path = make_image(tmp_path / "t.vhdx", 16 * MiB, block_size=1 * MiB)
    model = bytearray(random.Random(5).randbytes(10 * MiB)) + bytes(6 * MiB)
    async with await AsyncDisk.open(path) as disk:
        for block in range(10):  # allocated in order: block 9 ends the file
            await disk.write(block * MiB, bytes(model[block * MiB:(block + 1) * MiB]))
        model[2 * MiB:4 * MiB] = bytes(2 * MiB)
        await disk.write(2 * MiB, bytes(2 * MiB))  # blocks 2 and 3 still allocated, now all zeros
    size = path.stat().st_size
    result = compact(str(path))
    assert result.zero_blocks == 2 and result.moved == 2 * MiB
    assert path.stat().st_size == size - 2 * MiB
    qemu_check_clean(path)
    async with await AsyncDisk.open(path, read_only=True) as disk:
        assert await disk.read(0, disk.size) == model
        assert max(o + n for o, n, _ in on_disk(path).bat.allocated_ranges()) == path.stat().st_size


async def test_a_power_cut_while_packing_keeps_the_contents(tmp_path):
    path = make_image(tmp_path / "p.vhdx", 8 * MiB, block_size=1 * MiB)
    model = bytearray(random.Random(6).randbytes(8 * MiB))
    async with await AsyncDisk.open(path) as disk:
        await disk.write(0, bytes(model))
        model[MiB:3 * MiB] = bytes(2 * MiB)
        await disk.discard(MiB, 2 * MiB)  # two holes for the last two blocks
    original = path.read_bytes()

    def run_to(cut_at, seed):
        medium = Disk(original, cut_at, random.Random(seed))
        try:
            move_tail_blocks(path, host_factory=lambda p, writable: PowerCutHost(p, writable=writable, disk=medium))
        except PowerCut:
            pass
        return medium

    total = run_to(None, 0).ops
    assert total > 8
    for cut in range(1, total + 1):
        path.write_bytes(run_to(cut, cut).survivor())
        async with await AsyncDisk.open(path) as disk:
            assert await disk.read(0, disk.size) == model, f"cut at {cut}"
        assert (await trio.to_thread.run_sync(check_image, str(path)))["status"] == "clean"
