"""`vhdxfs commit CHILD`: the parent ends up reading exactly as the child did (a model says what that is),
the child stays a valid child of the changed parent, and a power cut anywhere keeps the child's view."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from tests.crash.powercut import Disk, PowerCut, PowerCutHost
from tests.helpers import make_image, need_tools, on_disk, qemu_check_clean, random_step, run, vhdxfs
from vhdxfs.engine import check_image, commit, create_child
from vhdxfs.engine.aio import AsyncDisk
from vhdxfs.engine.image import VhdxFile
from vhdxfs.engine.image.parents import linkage_guids
from vhdxfs.format.guids import parse_braced

MiB = 1 << 20
SIZE = 24 * MiB


async def read_all(path: Path) -> bytes:
    async with await AsyncDisk.open(path, read_only=True) as disk:
        return bytes(await disk.read(0, disk.size))


async def make_chain(tmp_path: Path, seed: int, sector: int = 512, child_block: int = 1 * MiB,
                     steps: int = 50, size: int = SIZE) -> tuple[Path, Path, bytearray]:
    """A parent with data (2 MiB blocks) and a child (other block size) with random writes, sector-sized
    and larger, and discards, among them whole child blocks that become ZERO over parent data."""
    rnd = random.Random(seed)
    base = make_image(tmp_path / "base.vhdx", size, block_size=2 * MiB, logical_sector_size=sector)
    model = bytearray(size)
    async with await AsyncDisk.open(base) as disk:
        data = rnd.randbytes(size - 4 * MiB)
        await disk.write(MiB, data)
        model[MiB:MiB + len(data)] = data
    child = tmp_path / "child.avhdx"
    create_child(child, base, block_size=child_block)
    async with await AsyncDisk.open(child) as disk:
        for _ in range(steps):
            await random_step(disk, model, rnd, rnd.choice([sector, 3 * sector, 70_000, 2 * MiB + sector]))
        for block in (3, 9):  # over parent data: in the child they must read as zeros, not as the parent
            await disk.discard(block * child_block, child_block)
            model[block * child_block:(block + 1) * child_block] = bytes(child_block)
            await disk.flush()
            assert on_disk(child).bat.payload(block)[0] == 2  # ZERO
    assert await read_all(child) == model
    return base, child, model


@pytest.mark.parametrize("sector", [512, 4096])
async def test_the_parent_reads_as_the_child_did(tmp_path, sector):
    need_tools("qemu-img")
    base, child, model = await make_chain(tmp_path, sector, sector)
    before = VhdxFile.open(base, read_only=True)
    old_guid = before.header.data_write_guid
    before.close()

    result = vhdxfs("commit", child)
    assert result.returncode == 0, result.stderr
    assert f"into {base}" in result.stdout

    assert await read_all(base) == model
    assert vhdxfs("check", base).returncode == 0
    if sector == 512:  # QEMU opens only 512-byte logical sectors
        qemu_check_clean(base)
        raw = tmp_path / "base.raw"
        assert run("qemu-img", "convert", "-f", "vhdx", "-O", "raw", base, raw).returncode == 0
        assert raw.read_bytes() == model  # QEMU reads the merged parent the same way
    # The child still opens against the changed parent (parent_linkage2 is the parent's new DataWriteGuid).
    parent, kid = VhdxFile.open(base, read_only=True), VhdxFile.open(child, read_only=True)
    try:
        new_guid = parent.header.data_write_guid
        assert new_guid != old_guid
        entries = kid.metadata.parent_locator.entries
        assert parse_braced(entries["parent_linkage2"]) == new_guid
        assert parse_braced(entries["parent_linkage"]) == old_guid
    finally:
        parent.close()
        kid.close()
    assert await read_all(child) == model
    assert vhdxfs("check", child).returncode == 0


async def test_committing_into_a_parent_that_is_itself_a_child(tmp_path):
    base, mid, model = await make_chain(tmp_path, 7)
    top = tmp_path / "top.avhdx"
    create_child(top, mid, block_size=4 * MiB)
    rnd = random.Random(8)
    async with await AsyncDisk.open(top) as disk:
        for _ in range(20):
            await random_step(disk, model, rnd, rnd.choice([512, 100_000, 5 * MiB]))
    result = commit(top)
    assert result.parent == mid and result.copied > 0
    assert await read_all(mid) == model  # mid, with base below it, now reads as top did
    assert await read_all(top) == model
    assert (await trio.to_thread.run_sync(check_image, str(mid)))["status"] == "clean"


async def test_committing_into_partially_present_blocks_of_an_earlier_session(tmp_path):
    """Regression: the merge writes sectors into blocks of the parent that are PARTIALLY_PRESENT since an
    earlier session, before anything has read them. Such a write must mark the bits in the sector bitmap
    the file holds (the engine loads it when it allocates), not in a blank one that would lose the
    earlier session's sectors."""
    base = make_image(tmp_path / "base.vhdx", 8 * MiB, block_size=1 * MiB)
    model = bytearray(random.Random(21).randbytes(8 * MiB))
    async with await AsyncDisk.open(base) as disk:
        await disk.write(0, bytes(model))
    mid = tmp_path / "mid.avhdx"
    create_child(mid, base, block_size=1 * MiB)
    async with await AsyncDisk.open(mid) as disk:  # the earlier session: one sector in each block
        for block in range(8):
            at = block * MiB + 4096 * block
            await disk.write(at, bytes([0xA0 + block]) * 512)
            model[at:at + 512] = bytes([0xA0 + block]) * 512
    assert {on_disk(mid).bat.payload(block)[0] for block in range(8)} == {7}  # PARTIALLY_PRESENT
    top = tmp_path / "top.avhdx"
    create_child(top, mid, block_size=2 * MiB)
    async with await AsyncDisk.open(top) as disk:  # other sectors of the same blocks, and one whole block
        for block in range(8):
            at = block * MiB + 65536 + 512 * block
            await disk.write(at, bytes([block + 1]) * 1536)
            model[at:at + 1536] = bytes([block + 1]) * 1536
        await disk.write(5 * MiB, b"\xee" * MiB)
        model[5 * MiB:6 * MiB] = b"\xee" * MiB
    result = commit(top)
    assert result.parent == mid and result.copied == 8 * 1536 + MiB - 1536 and result.zeroed == 0
    assert await read_all(mid) == model  # byte for byte: the earlier session's sectors are still there
    assert {on_disk(mid).bat.payload(block)[0] for block in range(8)} == {6, 7}
    assert check_image(str(mid))["status"] == "clean"


def test_a_non_differencing_image_has_nothing_to_commit(tmp_path):
    base = make_image(tmp_path / "base.vhdx", SIZE)
    result = vhdxfs("commit", base)
    assert result.returncode == 1
    assert result.stderr.startswith(f"vhdxfs: {base}: ") and "not a differencing image" in result.stderr


@pytest.mark.parametrize("cut_in", ["child", "parent"])
async def test_a_power_cut_anywhere_keeps_the_childs_view(tmp_path, cut_in):
    """Note <12>: at every instant the child matches its parent and reads as before; commit can be rerun."""
    need_tools("qemu-img")
    base, child, model = await make_chain(tmp_path, 11, steps=25, size=12 * MiB)
    base, child = base.resolve(), child.resolve()
    originals = {base: base.read_bytes(), child: child.read_bytes()}

    def run_to(cut_at: int | None, seed: int) -> dict[Path, Disk]:
        rnd = random.Random(seed)
        media = {p: Disk(content, cut_at if p == (child if cut_in == "child" else base) else None, rnd)
                 for p, content in originals.items()}

        def factory(path, writable):
            return PowerCutHost(path, writable=writable, disk=media[Path(path).resolve()])

        try:
            commit(child, None, host_factory=factory)
        except PowerCut:
            pass
        return media

    total = run_to(None, 0)[child if cut_in == "child" else base].ops
    assert total > 5
    cuts = range(1, total + 1) if total <= 30 else sorted(random.Random(1).sample(range(1, total + 1), 30))
    for cut in cuts:
        media = run_to(cut, cut)
        for path, medium in media.items():
            path.write_bytes(medium.survivor())
        assert await read_all(child) == model, f"cut at {cut}"
        assert (await trio.to_thread.run_sync(check_image, str(base)))["status"] == "clean"
        kid = VhdxFile.open(child, read_only=True)
        assert len(linkage_guids(kid.metadata)) in (1, 2)
        kid.close()
    # After the last cut, a rerun finishes the merge.
    commit(child)
    assert await read_all(base) == model
    qemu_check_clean(base)
