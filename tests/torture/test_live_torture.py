"""Live operations under concurrent clients: checkpoints, merges of inner layers and of the active top, and
resizes run again and again while the torture's clients read, write, discard and flush their own sectors
(tests/torture/model.py). Every read a client makes of its own sectors must give their newest value, the
disk must read as the model after each round, and every layer left must check clean.
"""

from __future__ import annotations

import collections
import itertools
import random
import time
from pathlib import Path

import pytest
import trio

from tests.helpers import need_tools, seed_dirs
from tests.torture.model import Model
from tests.torture.test_engine_torture import CONFIG_IDS, CONFIGS, STRESS_SEEDS, build, client, host_factory, show
from vhdxfs.engine import check_image
from vhdxfs.engine.aio import AsyncDisk
from vhdxfs.engine.live import checkpoint, merge

KiB, MiB = 1 << 10, 1 << 20


async def operator(disk: AsyncDisk, rnd: random.Random, done: trio.Event, stats: collections.Counter) -> None:
    """Checkpoints and merges, one after the other, until the clients are done (at least one of each)."""
    while not done.is_set() or not stats["checkpoints"] or not stats["merges"]:
        chain = disk.chain()
        if len(chain) < 2 or (len(chain) < 5 and rnd.random() < 0.5):
            await checkpoint(disk)
            stats["checkpoints"] += 1
        else:
            layer = rnd.choice(chain[:-1])  # any layer with a parent: the active top or an inner one
            await merge(disk, layer)
            stats["merges active" if layer == chain[0] else "merges inner"] += 1
            stats["merges"] += 1
        for _ in range(rnd.randrange(1, 20)):
            await trio.sleep(0)


async def live_torture(tmp_path: Path, seed: int, *, sector: int, differencing: bool, clients: int, steps: int
                       ) -> collections.Counter:
    rnd = random.Random(f"live:{seed}:{sector}:{differencing}")
    tmp_path.mkdir(parents=True, exist_ok=True)
    setup = build(tmp_path, rnd, sector=sector, differencing=differencing, clients=clients)
    model = Model(setup.initial, setup.patterns)
    gens = itertools.count(2)
    stats: collections.Counter = collections.Counter()
    async with await AsyncDisk.open(setup.target, host_factory=host_factory(setup, seed)) as disk:
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(operator, disk, random.Random(rnd.random()), done, stats)
            async with trio.open_nursery() as clients_nursery:
                for me in range(clients):
                    clients_nursery.start_soon(client, disk, model, setup.layout, me,
                                               random.Random(f"{seed}:{me}"), steps, gens, stats, True)
            done.set()
        got = bytes(await disk.read(0, setup.size))
        if got != model.current():
            model.check_own(0, got)
        chain = disk.chain()
    for layer in chain:
        report = await trio.to_thread.run_sync(check_image, layer)
        assert report["status"] == "clean" and not report["errors"] and not report["warnings"], report
    async with await AsyncDisk.open(chain[0], read_only=True) as reopened:
        assert bytes(await reopened.read(0, setup.size)) == model.current(), "the chain changed across close"
    assert not [p for p in tmp_path.glob("*.avhdx") if p not in chain and p != setup.target], "a merged layer left"
    stats["rounds"] += 1
    return stats


@pytest.mark.parametrize("sector,differencing", CONFIGS, ids=CONFIG_IDS)
async def test_checkpoints_and_merges_under_concurrent_clients(tmp_path, sector, differencing):
    need_tools("qemu-img")
    started = time.monotonic()
    stats: collections.Counter = collections.Counter()
    for seed in range(2):
        stats += await live_torture(tmp_path / str(seed), seed, sector=sector, differencing=differencing, clients=6,
                                    steps=40)
    show("live torture", stats, started)
    assert stats["checkpoints"] and stats["merges"]


@pytest.mark.stress
@pytest.mark.parametrize("sector,differencing", CONFIGS, ids=CONFIG_IDS)
async def test_live_torture_stress(tmp_path, sector, differencing):
    need_tools("qemu-img")
    started = time.monotonic()
    stats: collections.Counter = collections.Counter()
    for seed, work in seed_dirs(tmp_path, range(300, 300 + STRESS_SEEDS)):
        stats += await live_torture(work, seed, sector=sector, differencing=differencing, clients=4 + seed % 9,
                                    steps=60)
    show("live torture (stress)", stats, started)
