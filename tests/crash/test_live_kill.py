"""kill -9 at random moments of a process running checkpoints and merges under load (tests/crash/live_driver.py):
the chain the record names opens, checks clean, holds every write flushed before the kill; each checkpoint
that returned holds what was acknowledged before it began and nothing issued after it returned."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.crash.live_driver import SLOTS, slot_gen, slot_offset
from tests.helpers import make_image, seed_dirs
from vhdxfs.engine import Disk, check_image
from vhdxfs.engine.live import chain_top

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
RUNS = int(os.environ.get("VHDXFS_LIVE_KILLS", 50))


def parse(out: str) -> dict:
    """The driver's story up to the kill (a last line cut short is ignored)."""
    floor, newest = [0] * SLOTS, [0] * SLOTS
    checkpoints, begun, merged, merged_into = [], None, set(), set()
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        try:
            if word == "issued":
                slot, gen = map(int, rest.split())
                newest[slot] = gen
            elif word == "flushed":
                floor = list(map(int, rest.split(",")))
            elif word == "checkpoint-begin":
                begun = list(map(int, rest.split(",")))
            elif word == "checkpoint-done":
                path, ends = rest.split(" ")
                checkpoints.append((Path(path), begun, list(map(int, ends.split(",")))))
            elif word == "merge-begin":
                merged_into.add(Path(rest.split(" ")[1]))
            elif word == "merge-done":
                merged.add(Path(rest))
        except ValueError:
            break
    return {"floor": floor, "newest": newest, "checkpoints": checkpoints, "merged": merged,
            "merged into": merged_into}


def read_slots(path: Path) -> list[int]:
    with Disk.open(path, read_only=True) as disk:
        return [slot_gen(slot, bytes(disk.read(slot_offset(slot), 4096))) for slot in range(SLOTS)]


def kill_once(work: Path, seed: int, ops: str) -> dict:
    rnd = random.Random(seed)
    base = make_image(work / "disk.vhdx", 64 * MiB, block_size=MiB)
    proc = subprocess.Popen([sys.executable, "-m", "tests.crash.live_driver", str(base), str(seed), ops],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(rnd.uniform(0.3, 1.5))
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the driver ended on its own: {err[-2000:]}"
    story = parse(out)
    top = chain_top(base)
    with Disk.open(top) as disk:  # a writable open: the log of every layer it writes is replayed
        chain = disk.chain()
    for layer in chain:
        report = check_image(layer)
        assert report["status"] == "clean" and not report["errors"], report
    now = read_slots(top)
    for slot, (got, floor, newest) in enumerate(zip(now, story["floor"], story["newest"], strict=True)):
        assert floor <= got <= newest, f"slot {slot} holds generation {got}, flushed {floor}, newest {newest}"
    checked = 0
    for frozen, began, ended in story["checkpoints"]:
        if frozen in story["merged"] | story["merged into"] or not frozen.exists() or frozen not in chain:
            continue
        held = read_slots(frozen)
        for slot, (got, low, high) in enumerate(zip(held, began, ended, strict=True)):
            assert low <= got <= high, f"checkpoint {frozen.name} slot {slot}: {got} not in [{low}, {high}]"
        checked += 1
    return {"layers": len(chain), "checkpoints checked": checked, "flushes": out.count("\nflushed"),
            "merges": len(story["merged"])}


def kills(tmp_path: Path, ops: str, runs: int) -> dict:
    totals: dict = {}
    for seed, work in seed_dirs(tmp_path, range(runs)):
        for key, value in kill_once(work, seed, ops).items():
            totals[key] = totals.get(key, 0) + value
    print(f"{ops}: {runs} kills: {totals}")
    return totals


@pytest.mark.parametrize("ops", ["checkpoint", "checkpoint,merge"])
def test_kill_9_during_checkpoints_and_merges(tmp_path, ops):
    totals = kills(tmp_path, ops, 6)
    # Something was really checked: a surviving checkpoint, or (with merges, which may take every checkpoint
    # away in six short runs) a merge that ran before the kill.
    assert totals["checkpoints checked"] > 0 if ops == "checkpoint" else totals["merges"] > 0


@pytest.mark.stress
@pytest.mark.parametrize("ops", ["checkpoint", "checkpoint,merge"])
def test_kill_9_during_checkpoints_and_merges_stress(tmp_path, ops):
    totals = kills(tmp_path, ops, RUNS)
    assert totals["checkpoints checked"] > 0
