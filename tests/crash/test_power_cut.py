"""Invariants 1-3 under simulated power cuts at random instants of random workloads.

After every cut the image must open (log replay), `vhdxfs check` and `qemu-img check` must find it clean,
every write acknowledged before a completed flush must read back, and every other sector must hold
something that was really written there (no stale or foreign data).
"""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import pytest
import trio

from tests.crash.powercut import Disk, PowerCut, PowerCutHost
from tests.helpers import make_image, need_tools, on_disk, run
from vhdxfs.engine import PosixFile, create_child
from vhdxfs.engine.aio import AsyncDisk
from vhdxfs.tools.check import check_image

MiB = 1 << 20
SIZE = 24 * MiB
SECTOR = 512
STRESS_CUTS = 600  # per image type: 1,200 crash points in all


class Ledger:
    """What each sector may hold: its value at the last completed flush, or anything written since."""

    def __init__(self, initial: bytes) -> None:
        self.flushed = bytearray(initial)
        self.current = bytearray(initial)
        self.since: dict[int, set[bytes]] = {}

    def wrote(self, offset: int, data: bytes) -> None:
        self.current[offset:offset + len(data)] = data
        for s in range(offset // SECTOR, -(-(offset + len(data)) // SECTOR)):
            self.since.setdefault(s, set()).add(bytes(self.current[s * SECTOR:(s + 1) * SECTOR]))

    def flushed_now(self) -> None:
        self.flushed[:] = self.current
        self.since.clear()

    def verify(self, contents: bytes) -> None:
        for s in range(len(contents) // SECTOR):
            got = contents[s * SECTOR:(s + 1) * SECTOR]
            if got == self.flushed[s * SECTOR:(s + 1) * SECTOR]:
                continue
            assert got in self.since.get(s, ()), f"sector {s} holds data never written there"


async def workload(disk: AsyncDisk, ledger: Ledger, rnd: random.Random, steps: int) -> None:
    for _ in range(steps):
        off = rnd.randrange(0, SIZE, SECTOR)
        n = min(rnd.choice([SECTOR, 4096, 65536, 300 * 1024, 2 * MiB + 512]), SIZE - off)
        r = rnd.random()
        # The ledger learns of a write before it is issued: a cut in its middle may persist part of it.
        if r < 0.12:
            ledger.wrote(off, bytes(n))
            await disk.discard(off, n)
        elif r < 0.3:
            await disk.flush()
            ledger.flushed_now()
        else:
            data = rnd.randbytes(n)
            ledger.wrote(off, data)
            await disk.write(off, data)


async def one_cut(tmp_path: Path, seed: int, differencing: bool) -> tuple[bool, bool]:
    """Run one workload to a cut; return (the power was cut, the survivor had a log to replay)."""
    rnd = random.Random(seed)
    base = make_image(tmp_path / f"base{seed}.vhdx", SIZE, block_size=1 * MiB)
    initial = bytearray(SIZE)
    target = base
    if differencing:
        async with await AsyncDisk.open(base) as disk:
            initial[:] = rnd.randbytes(SIZE)
            await disk.write(0, bytes(initial))
        target = tmp_path / f"child{seed}.avhdx"
        create_child(target, base, block_size=1 * MiB)
    medium = Disk(target.read_bytes(), cut_at=rnd.randrange(5, 400), rnd=rnd)
    ledger = Ledger(bytes(initial))
    factory = functools.partial(PowerCutHost, disk=medium)
    try:
        disk = await AsyncDisk.open(target, host_factory=lambda p, writable: factory(p, writable=writable)
                                      if Path(p) == target else _real(p, writable))
        await workload(disk, ledger, rnd, 200)
        await disk.close()
    except PowerCut:
        pass
    target.write_bytes(medium.survivor())
    # Invariant 1: it opens (replaying the log) and checks clean, ours and QEMU's.
    replayed = on_disk(target).replayed_entries > 0
    async with await AsyncDisk.open(target) as disk:
        contents = bytes(await disk.read(0, SIZE))
    report = await trio.to_thread.run_sync(check_image, str(target))
    assert report["status"] == "clean", report
    if not differencing:
        result = run("qemu-img", "check", target)
        assert result.returncode == 0, result.stdout + result.stderr
    # Invariants 2 and 3: flushed writes survive, nothing else appears.
    ledger.verify(contents)
    return medium.cut, replayed


def _real(path, writable):
    return PosixFile(path, writable=writable)


@pytest.mark.parametrize("differencing", [False, True], ids=["dynamic", "differencing"])
async def test_power_cuts_at_random_points(tmp_path, differencing):
    need_tools("qemu-img")
    outcomes = [await one_cut(tmp_path, seed * 2 + differencing, differencing) for seed in range(12)]
    assert sum(cut for cut, _ in outcomes) >= 8, "most runs must really be cut short"
    assert any(replayed for _, replayed in outcomes), "some survivors must need a log replay"


@pytest.mark.stress
@pytest.mark.parametrize("differencing", [False, True], ids=["dynamic", "differencing"])
async def test_power_cuts_stress(tmp_path, differencing):
    need_tools("qemu-img")
    for seed in range(1000, 1000 + int(os.environ.get("VHDXFS_STRESS_CUTS", STRESS_CUTS))):
        await one_cut(tmp_path, seed, differencing)
        for f in tmp_path.iterdir():
            f.unlink()
