"""A chain of twenty checkpoints against a model: random writes, unaligned writes, discards and zeroes in every
layer; reads of the top equal the model; the chain map (vhdxfs/engine/disk/chainmap.py) resolves every range
as the walk through the layers does; extents agree with the model; opening a 64 TiB chain of twenty layers
stays small (the paged BAT)."""

from __future__ import annotations

import random
import tracemalloc

import trio

from tests.helpers import make_image
from vhdxfs.engine import Disk, ImageSpec, Kind, create_child, create_image
from vhdxfs.engine.aio import AsyncDisk
from vhdxfs.engine.live import checkpoint

KiB, MiB, TiB = 1 << 10, 1 << 20, 1 << 40
SIZE = 40 * MiB


def scribble(disk: Disk, model: bytearray, rnd: random.Random, ops: int) -> None:
    """Random writes (aligned or not), discards and zeroes, mirrored in ``model``."""
    for _ in range(ops):
        kind = rnd.random()
        offset = rnd.randrange(0, SIZE - 3 * MiB)
        if kind < 0.6:
            length = rnd.choice([512, 4 * KiB, 64 * KiB, MiB + 512, 3 * MiB]) + rnd.choice([0, 0, 17])
            offset += rnd.choice([0, 0, 3])
            data = rnd.randbytes(length)
            disk.write(offset, data)
            model[offset:offset + length] = data
        elif kind < 0.8:
            offset, length = offset // MiB * MiB, rnd.choice([MiB, 2 * MiB])
            disk.discard(offset, length)
            model[offset:offset + length] = bytes(length)
        else:
            length = rnd.choice([4 * KiB, 100 * KiB, MiB])
            disk.write_zeroes(offset, length, unmap=rnd.random() < 0.5)
            model[offset:offset + length] = bytes(length)


def build_chain(tmp_path, rnd: random.Random, layers: int) -> tuple[list, bytearray]:
    model = bytearray(SIZE)
    base = make_image(tmp_path / "base.vhdx", SIZE, block_size=4 * MiB)
    with Disk.open(base) as disk:
        scribble(disk, model, rnd, 30)
    chain = [base]
    for i in range(layers):
        child = tmp_path / f"layer{i:02}.avhdx"
        create_child(child, chain[-1], block_size=rnd.choice([MiB, 2 * MiB]))
        with Disk.open(child) as disk:
            scribble(disk, model, rnd, rnd.randrange(2, 12))
        chain.append(child)
    return chain, model


def runs_both_ways(disk: Disk, offset: int, length: int) -> tuple[list, list]:
    """The runs of a range through the chain map, and through the walk the map replaces."""
    top = disk._core  # noqa: SLF001 - the engine's own test of its map against its walk
    through_map: list = []
    assert top._resolve(offset, length, through_map, None) is None  # noqa: SLF001
    below, top.below = top.below, None
    walked: list = []
    try:
        assert top._resolve(offset, length, walked, None) is None  # noqa: SLF001
    finally:
        top.below = below
    return through_map, walked


def merged_runs(runs: list) -> list:
    """Runs with neighbours of the same answer joined (the map makes longer runs than the walk)."""
    out: list = []
    for run in runs:
        if out and out[-1][2:4] == (run.kind, run.depth) and out[-1][0] + out[-1][1] == run.offset and (
                run.kind != Kind.DATA or out[-1][4] + out[-1][1] == run.file_offset):
            last = out[-1]
            out[-1] = (last[0], last[1] + run.length, last[2], last[3], last[4])
        else:
            out.append((run.offset, run.length, run.kind, run.depth, run.file_offset))
    return out


def test_twenty_layers_read_as_the_model_and_the_map_agrees_with_the_walk(tmp_path):
    rnd = random.Random(20)
    chain, model = build_chain(tmp_path, rnd, 20)
    with Disk.open(chain[-1], read_only=True) as disk:
        # Bitmaps first: the walk stops where one is not loaded, the map must see the same.
        assert bytes(disk.read(0, SIZE)) == model
        for _ in range(300):
            offset = rnd.randrange(0, SIZE - 1)
            length = min(rnd.choice([512, 4 * KiB, 128 * KiB, MiB, 5 * MiB]), SIZE - offset)
            assert bytes(disk.read(offset, length)) == model[offset:offset + length], (offset, length)
            through_map, walked = runs_both_ways(disk, offset, length)
            assert merged_runs(through_map) == merged_runs(walked), (offset, length)
        extents = disk.extents()
        assert sum(e.length for e in extents) == SIZE
        for extent in extents:
            assert extent.layer == chain[-1 - extent.depth], extent
            if extent.kind != Kind.DATA:
                assert model[extent.offset:extent.offset + extent.length] == bytes(extent.length), extent


async def test_checkpoints_taken_while_writes_run_keep_the_model(tmp_path):
    base = make_image(tmp_path / "disk.vhdx", SIZE, block_size=2 * MiB)
    model = bytearray(SIZE)
    async with await AsyncDisk.open(base) as disk:
        async def writer(seed: int) -> None:
            wr = random.Random(seed)
            for _ in range(120):
                offset = wr.randrange(0, SIZE - 64 * KiB) // 512 * 512
                data = wr.randbytes(wr.choice([512, 4 * KiB, 64 * KiB]))
                await disk.write(offset, data)
                model[offset:offset + len(data)] = data
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, 1)
            for _ in range(20):
                await checkpoint(disk)
                await trio.sleep(0)
        assert len(disk.chain()) == 21
        assert bytes(await disk.read(0, SIZE)) == model
    with Disk.open(disk.chain()[0], read_only=True) as reopened:
        assert bytes(reopened.read(0, SIZE)) == model


def test_a_64_tib_chain_of_twenty_layers_opens_small(tmp_path):
    base = tmp_path / "base.vhdx"
    create_image(base, ImageSpec(64 * TiB))
    chain = [base]
    for i in range(20):
        child = tmp_path / f"c{i:02}.avhdx"
        create_child(child, chain[-1])
        chain.append(child)
    tracemalloc.start()
    try:
        with Disk.open(chain[-1], read_only=True) as disk:
            _current, peak = tracemalloc.get_traced_memory()
            extents = disk.extents()
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB, f"opening took {peak / MiB:.0f} MiB"
    assert [(e.kind, e.depth) for e in extents] == [(Kind.HOLE, 20)]


def test_locate_finds_what_the_plans_find(tmp_path):
    """The request path's shortcut (DiskCore.locate, locate_write: one run of data, no plan, no guard) answers
    exactly as the plans would, in the top and through the chain map, and otherwise says None."""
    rnd = random.Random(23)
    chain, model = build_chain(tmp_path, rnd, 6)
    with Disk.open(chain[-1]) as disk:
        assert bytes(disk.read(0, SIZE)) == model  # every sector bitmap loaded
        core = disk._core  # noqa: SLF001 - the engine's own test of its shortcut against its plans
        for block in range(0, SIZE // core.block_size, 3):  # whole blocks of the top: FULLY_PRESENT
            start = block * core.block_size
            disk.write(start, model[start:start + core.block_size])
        found: list[int] = []
        located_writes = 0
        for _ in range(3000):
            offset = rnd.randrange(0, SIZE - 1) // 512 * 512 + rnd.choice([0, 0, 0, 7])
            length = min(rnd.choice([512, 4 * KiB, 4 * KiB, 64 * KiB, MiB]), SIZE - offset)
            plan = core.plan_read(offset, length)
            assert plan is not None
            runs = list(plan.runs)
            plan.release()
            at = core.locate(offset, length)
            if at is not None:
                assert [(r.kind, r.depth, r.file_offset) for r in runs] == [(Kind.DATA, *at)], (offset, length)
                found.append(at[0])
            elif len(runs) == 1 and runs[0].kind == Kind.DATA and runs[0].depth == 0:
                top_block = core.bat.payload(offset // core.block_size)[0]
                assert top_block != 6, (offset, length)  # FULLY_PRESENT in the top: locate must find it
            write = core.plan_write(offset, length)
            at_write = core.locate_write(offset, length)
            if at_write is not None:
                assert write is not None and [r.file_offset for r in write.runs] == [at_write], (offset, length)
                located_writes += 1
            if write is not None:
                write.release()
        assert found.count(0) > 100 and len(found) - found.count(0) > 100 and located_writes > 100
        assert all(layer.guards.idle for layer in core.layers())
    with Disk.open(chain[-1], read_only=True) as disk:
        assert bytes(disk.read(0, SIZE)) == model
