"""Differencing images: reads fall through to the parent chain, writes stay in the child."""

from __future__ import annotations

import random
import shutil

import pytest

from tests.helpers import make_image, need_tools, on_disk, probe_read, random_step, run, sha256, vhdxfs
from vhdxfs.engine import ImageSpec, create_child, create_image
from vhdxfs.engine.aio import AsyncDisk
from vhdxfs.errors import ParentError
from vhdxfs.format.bat import PayloadState
from vhdxfs.format.guids import braced, new_guid
from vhdxfs.format.metadata import ParentLocator

MiB = 1 << 20
SIZE = 24 * MiB


async def fill(path, pattern: bytes, model: bytearray, offset: int, length: int) -> None:
    async with await AsyncDisk.open(path) as disk:
        data = (pattern * (length // len(pattern) + 1))[:length]
        await disk.write(offset, data)
        model[offset:offset + length] = data


async def random_io(path, model: bytearray, seed: str, steps: int = 80) -> None:
    rnd = random.Random(seed)
    async with await AsyncDisk.open(path) as disk:
        for step in range(steps):
            await random_step(disk, model, rnd, rnd.randrange(512, 5 * MiB))
            if step % 9 == 0:
                await disk.flush()
            await probe_read(disk, model, rnd, 3 * MiB)


@pytest.mark.parametrize("sector", [512, 4096])
async def test_random_writes_through_a_child_match_a_model_and_leave_the_parent_alone(tmp_path, sector):
    base = make_image(tmp_path / "base.vhdx", SIZE, block_size=1 * MiB, logical_sector_size=sector)
    model = bytearray(SIZE)
    await fill(base, b"parent!", model, 0, SIZE - 3 * MiB)
    digest = sha256(base)
    child = tmp_path / "child.avhdx"
    create_child(child, base)
    await random_io(child, model, f"child{sector}")
    async with await AsyncDisk.open(child, read_only=True) as disk:
        assert await disk.read(0, SIZE) == bytes(model)
    assert sha256(base) == digest


async def test_a_chain_of_three_reads_through_every_level(tmp_path):
    base = make_image(tmp_path / "base.vhdx", SIZE, block_size=2 * MiB)
    model = bytearray(SIZE)
    await fill(base, b"B", model, 0, 10 * MiB)
    mid = tmp_path / "mid.avhdx"
    create_child(mid, base)
    await fill(mid, b"M", model, 5 * MiB + 1000, 10 * MiB)
    top = tmp_path / "top.avhdx"
    create_child(top, mid)
    await fill(top, b"T", model, 12 * MiB - 7, 3 * MiB)
    async with await AsyncDisk.open(top, read_only=True) as disk:
        assert disk.chain() == [top, mid, base]
        assert await disk.read(0, SIZE) == bytes(model)
    result = vhdxfs("info", "--json", top)
    assert result.returncode == 0, result.stderr
    assert '"type": "differencing"' in result.stdout and str(base) in result.stdout


async def test_a_moved_chain_opens_by_relative_path(tmp_path):
    (tmp_path / "a" / "parents").mkdir(parents=True)
    base = make_image(tmp_path / "a" / "parents" / "base.vhdx", SIZE)
    model = bytearray(SIZE)
    await fill(base, b"xy", model, 0, MiB)
    create_child(tmp_path / "a" / "child.avhdx", base)
    shutil.move(tmp_path / "a", tmp_path / "b")
    async with await AsyncDisk.open(tmp_path / "b" / "child.avhdx", read_only=True) as disk:
        parent = disk.chain()[1]
        assert parent == tmp_path / "b" / "child.avhdx" / ".." / "parents" / "base.vhdx" or \
            parent.resolve() == (tmp_path / "b" / "parents" / "base.vhdx").resolve()
        assert await disk.read(0, MiB) == bytes(model[:MiB])


async def test_a_parent_changed_after_the_child_was_made_is_refused(tmp_path):
    base = make_image(tmp_path / "base.vhdx", SIZE)
    child = tmp_path / "child.avhdx"
    create_child(child, base)
    async with await AsyncDisk.open(base) as disk:
        await disk.write(0, b"changed")
    with pytest.raises(ParentError) as exc:
        await AsyncDisk.open(child)
    message = str(exc.value)
    assert str(base) in message and str(child) in message and message.count("{") >= 2


async def test_a_missing_parent_is_named_and_can_be_given_with_parent(tmp_path):
    base = make_image(tmp_path / "base.vhdx", SIZE)
    child = tmp_path / "child.avhdx"
    create_child(child, base)
    moved = tmp_path / "elsewhere.vhdx"
    base.rename(moved)
    with pytest.raises(ParentError, match="--parent"):
        await AsyncDisk.open(child)
    async with await AsyncDisk.open(child, parent=moved) as disk:
        assert disk.chain()[1] == moved
    described = vhdxfs("info", child)
    assert described.returncode == 0 and "parent not found" in described.stdout
    assert vhdxfs("check", child).returncode == 1
    chained = vhdxfs("info", child, "--parent", moved)
    assert chained.returncode == 0 and f"parent 1: {moved}" in chained.stdout
    assert vhdxfs("check", child, "--parent", moved).returncode == 0


async def test_a_parent_chain_that_loops_is_refused(tmp_path):
    child = tmp_path / "loop.avhdx"
    locator = ParentLocator({"parent_linkage": braced(new_guid()), "relative_path": ".\\loop.avhdx"})
    create_image(child, ImageSpec(SIZE, disk_type="differencing", parent_locator=locator))
    with pytest.raises(ParentError, match="loops"):
        await AsyncDisk.open(child, read_only=True)


async def test_discard_in_a_child_reads_zeros_not_the_parent(tmp_path):
    base = make_image(tmp_path / "base.vhdx", SIZE, block_size=1 * MiB)
    model = bytearray(SIZE)
    await fill(base, b"\xee", model, 0, SIZE)
    child = tmp_path / "child.avhdx"
    create_child(child, base, block_size=1 * MiB)
    async with await AsyncDisk.open(child) as disk:
        await disk.discard(2 * MiB, 3 * MiB + 512)  # whole blocks and a partial one
        await disk.flush()
        assert on_disk(child).bat.payload(2)[0] == PayloadState.ZERO
        assert await disk.read(2 * MiB, 3 * MiB + 512) == bytes(3 * MiB + 512)
        assert await disk.read(5 * MiB + 512, 512) == b"\xee" * 512


async def test_a_fully_written_block_becomes_fully_present(tmp_path):
    base = make_image(tmp_path / "base.vhdx", SIZE, block_size=1 * MiB)
    child = tmp_path / "child.avhdx"
    create_child(child, base, block_size=1 * MiB)
    async with await AsyncDisk.open(child) as disk:
        await disk.write(MiB, b"a" * 4096)
        await disk.flush()
        assert on_disk(child).bat.payload(1)[0] == PayloadState.PARTIALLY_PRESENT
        await disk.write(MiB + 4096, b"b" * (MiB - 4096))
        await disk.flush()
        assert on_disk(child).bat.payload(1)[0] == PayloadState.FULLY_PRESENT


async def test_parent_stays_clean_for_qemu_and_vhdxfs_check(tmp_path):
    need_tools("qemu-img")
    base = tmp_path / "base.vhdx"
    assert run("qemu-img", "create", "-f", "vhdx", base, "24M").returncode == 0
    model = bytearray(SIZE)
    await fill(base, b"q", model, MiB, MiB)
    digest = sha256(base)
    child = tmp_path / "c.avhdx"
    assert vhdxfs("create", child, "--parent", base).returncode == 0
    await random_io(child, model, "qemu-parent", steps=30)
    assert sha256(base) == digest
    assert run("qemu-img", "check", base).returncode == 0
    assert vhdxfs("check", base).returncode == 0
    assert vhdxfs("check", child).returncode == 0
    out = tmp_path / "merged.raw"
    assert vhdxfs("convert", child, out).returncode == 0
    assert out.read_bytes() == bytes(model)


async def test_an_aligned_write_into_a_partial_block_after_reopening(tmp_path):
    """Regression: the chunk's sector bitmap was not loaded when a PARTIALLY_PRESENT block from an earlier
    session got an aligned write before any read of it (KeyError in the bitmap)."""
    base = make_image(tmp_path / "base.vhdx", SIZE, block_size=1 * MiB)
    child = tmp_path / "child.avhdx"
    create_child(child, base, block_size=1 * MiB)
    async with await AsyncDisk.open(child) as disk:
        await disk.write(0, b"a" * 512)
    async with await AsyncDisk.open(child) as disk:
        await disk.write(512, b"b" * 512)
        assert await disk.read(0, 1024) == b"a" * 512 + b"b" * 512
