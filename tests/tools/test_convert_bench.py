"""benchmarks/run-convert's own logic, without building a disk: the data layout is the issue's (runs of
1-8 MiB, 4 KiB aligned, DATA bytes in all, inside the disk, never overlapping), and the visiting order
and the report are what docs/performance.md says of them."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from harness import convert as bench  # noqa: E402
from harness.convert_disks import data_layout  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30


@pytest.mark.parametrize("size, data", [(4 * GiB, 3 * GiB // 2), (16 * GiB, 4 * GiB), (256 * MiB, 64 * MiB)])
def test_the_data_layout_is_runs_of_1_to_8_mib_inside_the_disk(size, data):
    layout = data_layout(size, data, random.Random(1))
    assert sum(n for _o, n in layout) == data
    assert all(o % 4096 == 0 and n % 4096 == 0 for o, n in layout)
    assert all(MiB <= n <= 8 * MiB for _o, n in layout[:-1]) and 0 < layout[-1][1] <= 8 * MiB
    ends = [o + n for o, n in layout]
    assert all(ends[i] <= layout[i + 1][0] for i in range(len(layout) - 1)), "runs overlap"
    assert layout[0][0] >= 0 and ends[-1] <= size


def test_contenders_and_their_commands(tmp_path):
    args = argparse.Namespace(baseline=None, size="4G", data="1G", rounds=1, jobs=list(bench.JOBS))
    b = bench.Bench(args, tmp_path)
    assert b.contenders("vhdx-to-raw") == ["vhdxfs", "qemu-wb", "qemu"]
    assert b.contenders("compact") == ["vhdxfs"] and b.contenders("commit") == ["vhdxfs", "qemu-wb"]
    argv, _kw, out, ref = b.command("vhdx-to-raw", "qemu-wb")
    assert [str(a) for a in argv[:4]] == ["qemu-img", "convert", "-t", "writeback"] and out.name == "out.raw"
    argv, _kw, out, ref = b.command("chain-to-vhdx", "vhdxfs")
    assert argv[-3:] == ["convert", tmp_path / "child.avhdx", tmp_path / "out.vhdx"] and ref == "child.qcow2"
    argv, _kw, out, _ref = b.command("raw-to-vhdx", "qemu")
    assert "-t" not in argv  # qemu-img's own default: cache=unsafe, nothing flushed


def test_the_report_gives_medians_spread_and_the_ratio_to_qemu_img_writeback(tmp_path):
    args = argparse.Namespace(baseline=None, size="4G", data="1G", rounds=2, jobs=["vhdx-to-raw"])
    b = bench.Bench(args, tmp_path)
    b.disks = {"size": 4 * GiB, "data": GiB, "runs": 200, "half": {"blocks": 64, "block_size": 16 * MiB}}
    def s(w):
        return {"wall_s": w, "cpu_s": w / 2, "allocated": GiB}
    b.results = {"vhdx-to-raw": {"vhdxfs": [s(1.0), s(1.2), s(0.9), s(5.0)],
                                 "qemu-wb": [s(2.0), s(2.2), s(1.8), s(2.1)], "qemu": []}}
    b.errors = {("vhdx-to-raw", "qemu"): "qemu-img failed"}
    text = bench.report(b, 60)
    assert "| vhdxfs | 1.10 (0.90–5.00) | 0.55 | 1024 | 0.54x |" in text
    assert "| qemu | n/a: qemu-img failed |" in text
