"""The benchmark harnesses' own logic (benchmarks/bench.py, side_by_side.py), without running fio.

What matters for the figures they report: every allocating job writes where nothing was written before on
its copy, and the side-by-side report's ratios are ratios of medians.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
bench = importlib.import_module("bench")
side_by_side = importlib.import_module("side_by_side")

GiB = 1 << 30


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_the_filled_image_job_allocates_above_the_filled_span_and_inside_the_image(quick):
    size = 8 * GiB
    jobs = {j["name"]: j for j in bench.jobs(quick, size)}
    fill = next(j for j in jobs.values() if j.get("fills"))
    filled = jobs["rand write 4k fsync/32, filled image"]
    assert not filled.get("fresh"), "it must run on the copy the fill job wrote"
    assert filled["offset"] >= fill.get("offset", 0) + fill["size"]
    assert filled["offset"] + filled["size"] <= size
    assert filled["fsync"] == 32 and filled["bs"] == "4k" and filled["rw"] == "randwrite"


def test_the_allocated_space_write_job_stays_inside_the_filled_span():
    jobs = {j["name"]: j for j in bench.jobs(False, 8 * GiB)}
    fill = next(j for j in jobs.values() if j.get("fills"))
    written = jobs["rand write 4k"]
    assert written.get("offset", 0) >= fill.get("offset", 0)
    assert written.get("offset", 0) + written["size"] <= fill.get("offset", 0) + fill["size"]


def test_selecting_fsync_jobs_keeps_both_allocating_jobs_in_their_order():
    names = [j["name"] for j in bench.select(bench.jobs(False, 8 * GiB), ["fsync"])]
    assert names == ["rand write 4k fsync/32, filled image", "rand write 4k fsync/32, fresh"]


def test_the_side_by_side_report_gives_ratios_of_medians_and_the_lowest_run():
    runs = [
        {"alloc4k": {"vhdxfs": [200, 100], "qsd": [100, 100]}, "fsync32": {"vhdxfs": [90, 90], "qsd": [100, 100]}},
        {"alloc4k": {"vhdxfs": [300, 300], "qsd": [100, 100]}, "fsync32": {"vhdxfs": [120, 80], "qsd": [50, 150]}},
        {"alloc4k": {"vhdxfs": [100, 100], "qsd": [100, 100]}, "fsync32": {"vhdxfs": [110, 110], "qsd": [100, 100]}},
    ]
    text = side_by_side.report(runs, SimpleNamespace(size="8G", runtime=6))
    assert "alloc4k: median ratio 1.50x over 3 runs, lowest 1.00x, highest 3.00x" in text
    assert "fsync32: median ratio 1.00x over 3 runs, lowest 0.90x, highest 1.10x" in text
