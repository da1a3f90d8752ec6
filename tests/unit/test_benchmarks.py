"""The benchmark harness's own logic (benchmarks/harness), without running fio or any daemon.

What matters for the figures it reports: every allocating job writes where nothing was written before on
its copy; both front ends pick jobs by the same rule; the visiting order puts vhdxfs-base right beside
vhdxfs; and the reports' ratios are ratios of medians, vhdxfs/vhdxfs-base included, on NBD as on FUSE.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from harness import jobs, side_by_side  # noqa: E402

GiB = 1 << 30


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_the_filled_image_job_allocates_above_the_filled_span_and_inside_the_image(quick):
    size = 8 * GiB
    by_name = {j["name"]: j for j in jobs.fuse_jobs(quick, size)}
    fill = next(j for j in by_name.values() if j.get("fills"))
    filled = by_name["rand write 4k fsync/32, filled image"]
    assert not filled.get("fresh"), "it must run on the copy the fill job wrote"
    assert filled["offset"] >= fill.get("offset", 0) + fill["size"]
    assert filled["offset"] + filled["size"] <= size
    assert filled["fsync"] == 32 and filled["bs"] == "4k" and filled["rw"] == "randwrite"


def test_the_allocated_space_write_job_stays_inside_the_filled_span():
    by_name = {j["name"]: j for j in jobs.fuse_jobs(False, 8 * GiB)}
    fill = next(j for j in by_name.values() if j.get("fills"))
    written = by_name["rand write 4k"]
    assert written.get("offset", 0) >= fill.get("offset", 0)
    assert written.get("offset", 0) + written["size"] <= fill.get("offset", 0) + fill["size"]


def test_selecting_fsync_jobs_keeps_both_allocating_jobs_in_their_order():
    names = [j["name"] for j in jobs.select(jobs.fuse_jobs(False, 8 * GiB), ["fsync"])]
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
