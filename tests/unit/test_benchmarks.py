"""The benchmark harness's own logic (benchmarks/harness), without running fio or any daemon.

What matters for the figures it reports: every allocating job writes where nothing was written before on
its copy; both front ends pick jobs by the same rule; the visiting order puts vhdxfs-base right beside
vhdxfs; and the reports' ratios are ratios of medians, vhdxfs/vhdxfs-base included, on NBD as on FUSE.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from harness import fuse, jobs, nbd, nbd_report, nbd_servers, options, results, side_by_side  # noqa: E402
from harness.baseline import BASELINE  # noqa: E402

GiB = 1 << 30


# -- the jobs ------------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("front", ["fuse", "nbd"])
@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_both_front_ends_fill_one_span_first_and_every_later_job_reads_or_rewrites_it(front, quick):
    size = 8 * GiB
    every = jobs.JOBS[front](quick, size, 7)
    names = [j["name"] for j in every]
    assert len(set(names)) == len(names)
    assert every[0].get("fills") and [j for j in every if j.get("fills")] == every[:1]
    span = jobs.span_of(quick, size)
    assert span == (256 << 20 if quick else 2 * GiB)
    for j in every:
        assert j["writes"] == ("write" in j["rw"]), j["name"]
        assert j["size"] == span, j["name"]
        if "runtime" in j:
            assert j["runtime"] == 7, "--runtime reaches every timed job"
        if not j.get("fresh") and "offset" not in j:
            continue  # inside the span the fill job wrote
        assert j["offset"] >= span and j["offset"] + j["size"] <= size, j["name"]


def test_the_timed_jobs_default_to_12_seconds_and_4_with_quick():
    for front in ("fuse", "nbd"):
        assert {j["runtime"] for j in jobs.JOBS[front](False, 8 * GiB) if "runtime" in j} == {12}
        assert {j["runtime"] for j in jobs.JOBS[front](True, 8 * GiB) if "runtime" in j} == {4}


def test_a_small_image_shrinks_the_span_to_a_quarter_so_the_fresh_jobs_fit():
    size = 1 * GiB
    for j in jobs.fuse_jobs(False, size):
        assert j.get("offset", 0) + j["size"] <= size


def test_fio_runs_fuse_jobs_with_o_direct_psync_and_nbd_jobs_at_their_queue_depth():
    fsync = next(j for j in jobs.fuse_jobs(False, 8 * GiB) if j.get("fresh"))
    argv = jobs.fio_argv(fsync, jobs.psync_target(Path("/m/disk.raw")))
    for arg in ("--direct=1", "--ioengine=psync", "--filename=/m/disk.raw", f"--offset={2 * GiB}",
                "--fsync=32", "--runtime=12", "--time_based", "--rw=randwrite", "--bs=4k"):
        assert arg in argv
    qd1 = next(j for j in jobs.nbd_jobs(False, 8 * GiB) if j["name"] == "rand read 4k QD1")
    argv = jobs.fio_argv(qd1, jobs.nbd_target(Path("/w/s.sock")), runtime=3)
    assert "--iodepth=1" in argv and "--runtime=3" in argv and "--ioengine=nbd" in argv
    assert "--uri=nbd+unix:///?socket=/w/s.sock" in argv and "--direct=1" not in argv


def test_fio_output_after_notes_gives_the_side_of_the_job():
    out = ('fio: connected to NBD server\n{"jobs": [{"error": 0, "read": {"bw_bytes": 2097152, "iops": 512.0, '
           '"total_ios": 1024, "clat_ns": {"mean": 3000.0, "percentile": {"99.000000": 9000}}}, "write": {}}]}')
    got = jobs.parse_fio(out, {"rw": "randread"})
    assert got == {"mib_s": 2.0, "iops": 512.0, "ios": 1024, "clat_mean_us": 3.0, "clat_p99_us": 9.0}


# -- one selection for both front ends ---------------------------------------------------------------------
def names_of(picked):
    return [j["name"] for j in picked]


def test_selecting_fsync_jobs_keeps_both_allocating_jobs_in_their_order():
    names = names_of(jobs.select(jobs.fuse_jobs(False, 8 * GiB), ["fsync"]))
    assert names == ["rand write 4k fsync/32, filled image", "rand write 4k fsync/32, fresh"]


def test_a_pattern_equal_to_a_job_name_picks_that_job_only_on_both_front_ends():
    assert names_of(jobs.select(jobs.nbd_jobs(False, 8 * GiB), ["RAND READ 4K QD1"])) == ["rand read 4k QD1"]
    assert names_of(jobs.select(jobs.fuse_jobs(False, 8 * GiB), ["rand read 4k"])) == ["rand read 4k"]
    assert names_of(jobs.select(jobs.fuse_jobs(False, 8 * GiB), ["rand write 4k"])) == ["rand write 4k"]


def test_any_other_pattern_picks_every_job_containing_it_in_the_usual_order():
    assert names_of(jobs.select(jobs.fuse_jobs(False, 8 * GiB), ["rand read"])) == [
        "rand read 4k", "rand read 4k, 4 jobs"]
    assert names_of(jobs.select(jobs.nbd_jobs(False, 8 * GiB), ["qd16", "rand read 4k"])) == [
        "seq write 1M QD16, fresh", "seq write 1M QD16, allocated", "seq read 1M QD16", "rand read 4k QD1",
        "rand read 4k QD16", "rand read 4k 4 jobs QD16", "rand write 4k QD16"]
    assert jobs.select(jobs.nbd_jobs(False, 8 * GiB), None) == jobs.nbd_jobs(False, 8 * GiB)
    assert jobs.unmatched(jobs.nbd_jobs(False, 8 * GiB), ["qd1", "qd64"]) == ["qd64"]


def nbd_args(*argv: str) -> argparse.Namespace:
    return nbd.parse_args(list(argv))


def test_both_command_lines_pick_jobs_with_the_shared_selection():
    args = nbd_args("--jobs", "rand read 4k QD1", "--profile", "rand write 4k QD16", "--quick")
    assert args.jobs == ["rand read 4k QD1"] and args.profile == ["rand write 4k QD16"] and args.runtime == 4
    ap = options.parser("benchmarks/run", None, fuse.CONTENDERS, fuse.OPTIONAL, quick="", rounds="", jobs_example="")
    fargs = ap.parse_args(["--jobs", "rand read 4k,fsync", "--runtime", "2"])
    options.finish(ap, fargs, "fuse", fuse.CONTENDERS + fuse.OPTIONAL)
    assert fargs.jobs == ["rand read 4k", "fsync"] and fargs.runtime == 2
    with pytest.raises(SystemExit):
        nbd_args("--jobs", "fsync/32")  # FUSE jobs only


# -- vhdxfs-base on NBD ---------------------------------------------------------------------------------------
@pytest.fixture
def other_checkout(tmp_path):
    (tmp_path / "vhdxfs").mkdir()
    (tmp_path / "vhdxfs" / "cli.py").write_text("")
    return tmp_path


def test_nbd_baseline_adds_vhdxfs_base_right_after_vhdxfs(other_checkout):
    assert nbd_args("--baseline", str(other_checkout)).contenders == ["vhdxfs", BASELINE, "qemu-nbd"]
    args = nbd_args("--baseline", str(other_checkout), "--contenders", "qemu-nbd,vhdxfs,nbdkit-python")
    assert args.contenders == ["qemu-nbd", "vhdxfs", BASELINE, "nbdkit-python"]
    assert args.baseline == other_checkout.resolve()


def test_nbd_vhdxfs_base_needs_a_checkout_other_than_this_one(other_checkout, tmp_path):
    with pytest.raises(SystemExit):
        nbd_args("--contenders", f"vhdxfs,{BASELINE}")
    with pytest.raises(SystemExit):
        nbd_args("--baseline", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit):
        nbd_args("--baseline", str(Path(nbd.__file__).resolve().parents[2]))


def test_the_visits_go_a_b_b_a_with_vhdxfs_base_beside_vhdxfs(other_checkout):
    bench = nbd.NbdBench(nbd_args("--baseline", str(other_checkout), "--rounds", "2"), Path("/nonexistent"))
    seen = []
    bench.visit = seen.append
    bench.contend()
    once = ["vhdxfs", BASELINE, "qemu-nbd", "qemu-nbd", BASELINE, "vhdxfs"]
    assert seen == once * 2


def test_the_nbd_vhdxfs_base_visit_serves_with_the_baseline_code_and_vhdxfs_with_its_own(
        other_checkout, tmp_path, monkeypatch):
    bench = nbd.NbdBench(nbd_args("--baseline", str(other_checkout)), tmp_path)
    bench.base.write_bytes(b"image")
    served = []

    @contextlib.contextmanager
    def fake_server(name, image, sock, size, base=None):
        served.append((name, image.name, base))
        yield nbd_servers.Server(name, sock, 1, ["vhdxfs", "serve"], dict(base.env) if base else {})

    monkeypatch.setattr(nbd, "vhdxfs_server", fake_server)
    for name in ("vhdxfs", BASELINE):
        with bench.server(name) as srv:
            assert srv.name == name
    assert served == [("vhdxfs", "vhdxfs.vhdx", None), (BASELINE, f"{BASELINE}.vhdx", bench.baseline)]
    assert bench.baseline.src == other_checkout.resolve()
    assert bench.commands[BASELINE]["env"]["PYTHONPATH"] == str(other_checkout.resolve())


def sample(value: float, cpu: float = 30.0) -> dict:
    return {"iops": value, "mib_s": value / 256, "cpu_us_per_io": cpu, "main_cpu_us_per_io": cpu / 2,
            "other_cpus": 0.0}


def nbd_bench_with_results(checkout: Path) -> nbd.NbdBench:
    """Two rounds of rand read 4k QD16: vhdxfs 30k/33k/36k/39k, vhdxfs-base 20k..26k, qemu-nbd 40k each."""
    bench = nbd.NbdBench(nbd_args("--baseline", str(checkout), "--rounds", "2", "--jobs", "rand read 4k QD16"),
                         Path("/nonexistent"))
    bench.all_jobs = jobs.nbd_jobs(False, 8 * GiB)
    bench.jobs = jobs.select(bench.all_jobs, bench.args.jobs)
    bench.span = bench.all_jobs[0]["size"]
    per = {"vhdxfs": [30e3, 33e3, 36e3, 39e3], BASELINE: [20e3, 22e3, 24e3, 26e3], "qemu-nbd": [40e3] * 4}
    for name, figures in per.items():
        bench.results[name] = {"rand read 4k QD16": [sample(v) for v in figures]}
    return bench


def test_the_nbd_table_gives_the_ratio_of_medians_vhdxfs_over_vhdxfs_base(other_checkout):
    text = nbd_report.table(nbd_bench_with_results(other_checkout))
    head, _, row = text.splitlines()[:3]
    assert head.endswith("| vhdxfs/qemu-nbd | vhdxfs/vhdxfs-base |")
    assert f"{BASELINE} median (min–max)" in head
    cells = [c.strip() for c in row.strip("|").split("|")]
    # medians: vhdxfs 34.5k, vhdxfs-base 23k, qemu-nbd 40k
    assert cells == ["rand read 4k QD16", "IOPS", "34.5k (30.0k–39.0k)", "23.0k (20.0k–26.0k)",
                     "40.0k (40.0k–40.0k)", "0.86x", "1.50x"]
    assert "- rand read 4k QD16 (IOPS): vhdxfs 30000, 33000, 36000, 39000; vhdxfs-base 20000, 22000, 24000, " \
           "26000; ratio of medians 1.500" in text
    assert "| rand read 4k QD16 | 30.0 (15.0) | 30.0 (15.0) | 30.0 (15.0) |" in text, "CPU per request for all"


def test_the_nbd_report_and_record_carry_the_baseline_comparison(other_checkout):
    bench = nbd_bench_with_results(other_checkout)
    text = nbd_report.report(bench, 60.0, ["--baseline", str(other_checkout)])
    assert f"vhdxfs-base code: {other_checkout.resolve()}" in text
    assert "ratio of medians 1.500" in text and "| 1.50x |" in text
    assert "order per round: vhdxfs vhdxfs-base qemu-nbd qemu-nbd vhdxfs-base vhdxfs" in text
    row = results.comparison(bench)["rand read 4k QD16"]
    assert row["ratio_of_medians"] == pytest.approx(1.5) and row[BASELINE] == [20e3, 22e3, 24e3, 26e3]


def test_a_slower_vhdxfs_is_flagged_and_a_missing_side_is_n_a(other_checkout):
    bench = nbd_bench_with_results(other_checkout)
    bench.results[BASELINE]["rand read 4k QD16"] = [sample(50e3)] * 4
    assert "ratio of medians 0.690 (below 0.95)" in nbd_report.table(bench)
    del bench.results["vhdxfs"]
    assert "vhdxfs n/a; vhdxfs-base 50000, 50000, 50000, 50000; ratio of medians n/a" in nbd_report.table(bench)


def test_the_fuse_table_keeps_its_ratio_columns_and_the_baseline_last(other_checkout):
    ap = options.parser("benchmarks/run", None, fuse.CONTENDERS, fuse.OPTIONAL, quick="", rounds="", jobs_example="")
    args = ap.parse_args(["--baseline", str(other_checkout), "--jobs", "seq read 1M,rand write 4k"])
    options.finish(ap, args, "fuse", fuse.CONTENDERS + fuse.OPTIONAL)
    assert args.contenders == ["vhdxfs", BASELINE, "qsd", "vhdimount", "passthrough"]
    bench = fuse.FuseBench(args, Path("/nonexistent"))
    bench.all_jobs = jobs.fuse_jobs(False, 8 * GiB)
    bench.jobs = jobs.select(bench.all_jobs, args.jobs)
    for name, v in {"vhdxfs": 300, BASELINE: 200, "qsd": 100, "vhdimount": 150, "passthrough": 400}.items():
        bench.results[name] = {j["name"]: [{"iops": v, "mib_s": v}, {"iops": v, "mib_s": v}] for j in bench.jobs}
    lines = fuse.table(bench).splitlines()
    assert lines[0] == ("| job | unit | vhdxfs | vhdxfs-base | qsd | vhdimount | passthrough | vhdxfs/qsd | "
                        "vhdxfs/passthrough | vhdxfs/vhdxfs-base |")
    assert lines[2] == "| seq read 1M | MiB/s | 300 | 200 | 100 | 150 | 400 | 3.00x | 0.75x | 1.50x |"
    assert lines[3] == ("| rand write 4k | IOPS (MiB/s) | 300 (1.2) | 200 (0.8) | 100 (0.4) | — | 400 (1.6) | "
                        "3.00x | 0.75x | 1.50x |")


# -- side by side -------------------------------------------------------------------------------------------
def test_the_side_by_side_report_gives_ratios_of_medians_and_the_lowest_run():
    runs = [
        {"alloc4k": {"vhdxfs": [200, 100], "qsd": [100, 100]}, "fsync32": {"vhdxfs": [90, 90], "qsd": [100, 100]}},
        {"alloc4k": {"vhdxfs": [300, 300], "qsd": [100, 100]}, "fsync32": {"vhdxfs": [120, 80], "qsd": [50, 150]}},
        {"alloc4k": {"vhdxfs": [100, 100], "qsd": [100, 100]}, "fsync32": {"vhdxfs": [110, 110], "qsd": [100, 100]}},
    ]
    text = side_by_side.report(runs, SimpleNamespace(size="8G", runtime=6))
    assert "alloc4k: median ratio 1.50x over 3 runs, lowest 1.00x, highest 3.00x" in text
    assert "fsync32: median ratio 1.00x over 3 runs, lowest 0.90x, highest 1.10x" in text
