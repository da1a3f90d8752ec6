"""kill -9 of the real mount daemon at random moments while `vhdxfs checkpoint` and `vhdxfs merge` run on it
under fsync'd load: the chain (through its record) opens, every layer checks clean, every fsync'd write
reads back. The same engine steps are killed a thousand more ways in tests/crash/test_live_kill.py; this is
the whole daemon, its control channel and its records."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import pytest

from tests.crash.test_kill_daemon import SLOT, after_kill, writer
from tests.helpers import make_image, need_root_fuse, need_tools, vhdxfs
from vhdxfs.engine import Disk, check_image
from vhdxfs.engine.live import chain_top
from vhdxfs.mount.daemon import state_file

MiB = 1 << 20
SIZE = 96 * MiB
RUNS = int(os.environ.get("VHDXFS_LIVE_DAEMON_KILLS", 50))


def operator(mountpoint, ops: str, stop: threading.Event, rnd: random.Random, said: list[str]) -> None:
    """Checkpoints (and merges of a random layer) through the CLI until the daemon is gone."""
    while not stop.is_set():
        chain = vhdxfs("checkpoints", mountpoint, "--json")
        if chain.returncode != 0:
            return
        layers = [layer["path"] for layer in json.loads(chain.stdout)]  # top first
        if ops == "checkpoint" or len(layers) < 2 or rnd.random() < 0.4:
            result = vhdxfs("checkpoint", mountpoint)
        else:
            result = vhdxfs("merge", mountpoint, os.path.basename(layers[rnd.randrange(len(layers) - 1)]))
        said.append(result.stderr.strip() or "ok")


def kill_once(tmp_path, seed: int, ops: str) -> int:
    rnd = random.Random(seed)
    work = tmp_path / str(seed)
    work.mkdir()
    image = make_image(work / "load.vhdx", SIZE, block_size=MiB)
    mountpoint = work / "mnt"
    mountpoint.mkdir()
    assert vhdxfs("mount", image, mountpoint).returncode == 0
    pid = int(state_file(mountpoint).read_text().split()[0])
    slots = list(range(SIZE // SLOT))
    rnd.shuffle(slots)
    ledger: dict[int, bytes] = {}
    stop = threading.Event()
    said: list[str] = []
    load = threading.Thread(target=writer, args=(mountpoint / "load.raw", slots, ledger, stop, rnd.random()))
    ops_thread = threading.Thread(target=operator, args=(mountpoint, ops, stop, rnd, said))
    load.start()
    ops_thread.start()
    time.sleep(rnd.uniform(0.3, 2.0))
    os.kill(pid, signal.SIGKILL)
    stop.set()
    load.join(timeout=30)
    ops_thread.join(timeout=60)
    after_kill(pid, mountpoint)
    top = chain_top(image)
    with Disk.open(top) as disk:  # writable: every layer's log replayed
        chain = disk.chain()
        for slot, data in ledger.items():
            assert bytes(disk.read(slot * SLOT, SLOT)) == data, f"fsync'd write at slot {slot} lost"
    for layer in chain:
        report = check_image(layer)
        assert report["status"] == "clean" and not report["errors"], report
    return len(chain)


def kills(tmp_path, ops: str, runs: int) -> None:
    need_root_fuse()
    need_tools("qemu-img")
    layers = sum(kill_once(tmp_path, seed, ops) for seed in range(runs))
    print(f"{ops}: {runs} kills of the daemon, {layers} layers in the chains left")
    assert layers > runs, "some kills must have met a chain the operations made"


@pytest.mark.parametrize("ops", ["checkpoint", "merge"])
def test_kill_9_of_the_daemon_during_checkpoints_and_merges(tmp_path, ops):
    kills(tmp_path, ops, 3)


@pytest.mark.stress
@pytest.mark.parametrize("ops", ["checkpoint", "merge"])
def test_kill_9_of_the_daemon_during_checkpoints_and_merges_stress(tmp_path, ops):
    kills(tmp_path, ops, RUNS)
