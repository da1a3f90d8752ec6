"""benchmarks/run-convert: the offline data movers (convert, compact, commit) beside qemu-img, A B B A.

The disks are built once (convert_disks.py). Then, job by job, the contenders visit in the order A B C C B A
per round, each visit on a fresh output (compact and commit: fresh copies of their images), its inputs read
just before so the page cache is warm as in the issue that asked for this, and after a `sync` so no visit
pays for the write-back of the one before; none of that is timed. A visit is the whole command, start-up
and final flush included:

  vhdxfs      vhdxfs convert SRC DST (flushes: fsync of a raw output, the VHDX closed)
  qemu-wb     qemu-img convert -t writeback ... (flushes at the end, like vhdxfs)
  qemu        qemu-img convert ... (its default cache mode, unsafe: nothing is flushed)
  vhdxfs-base the vhdxfs of another checkout (--baseline DIR), as before a change

Jobs: vhdx-to-raw, raw-to-vhdx, vhdx-to-vhdx (src.vhdx), chain-to-vhdx (vhdxfs: a VHDX child over src.vhdx;
qemu-img: the same chain in qcow2, as it reads no VHDX child), compact (half.vhdx: vhdxfs only), commit
(vhdxfs: the VHDX child into a copy of src.vhdx; qemu-img commit: the qcow2 child into a copy of its base).
Every output of the first round is compared with its source by qemu-img compare. Reported: median wall
seconds with min-max, median CPU seconds, the output's allocation on the host (du), and vhdxfs/qemu-wb.
Saved under benchmarks/results/convert-<timestamp>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .baseline import BASELINE, Baseline, checkout, vhdxfs_cmd
from .convert_disks import build
from .procs import HERE, REPO, GiB, Unavailable, log, parse_size, run
from .results import machine, machine_line, save_results, versions

JOBS = ("vhdx-to-raw", "raw-to-vhdx", "vhdx-to-vhdx", "chain-to-vhdx", "compact", "commit")
QEMU_ONLY_CONVERT = ("vhdx-to-raw", "raw-to-vhdx", "vhdx-to-vhdx", "chain-to-vhdx")
# job -> (vhdxfs source, qemu-img source, qemu-img source format, output, the file the output must equal)
CONVERSIONS = {
    "vhdx-to-raw": ("src.vhdx", "src.vhdx", "vhdx", "out.raw", "src.raw"),
    "raw-to-vhdx": ("src.raw", "src.raw", "raw", "out.vhdx", "src.raw"),
    "vhdx-to-vhdx": ("src.vhdx", "src.vhdx", "vhdx", "out.vhdx", "src.raw"),
    "chain-to-vhdx": ("child.avhdx", "child.qcow2", "qcow2", "out.vhdx", "child.qcow2"),
}

CHAIN_BASES = {"child.avhdx": ["src.vhdx"], "child.qcow2": ["base.qcow2"]}  # what a chain's top reads too


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.base = Baseline(args.baseline) if args.baseline else None
        self.vhdxfs, self.env = vhdxfs_cmd(None)
        self.results: dict[str, dict[str, list[dict[str, float]]]] = {}
        self.disks: dict[str, Any] = {}
        self.errors: dict[tuple[str, str], str] = {}  # (job, contender) -> why it is n/a

    def contenders(self, job: str) -> list[str]:
        names = ["vhdxfs", *([BASELINE] if self.base else [])]
        if job in QEMU_ONLY_CONVERT or job == "commit":
            names += ["qemu-wb"] + (["qemu"] if job in QEMU_ONLY_CONVERT else [])
        return names

    def command(self, job: str, who: str) -> tuple[list[Any], dict[str, Any], Path, str]:
        """(argv, run keywords, the output whose allocation is reported, what it must read as)."""
        w = self.work
        cmd, kw = (vhdxfs_cmd(self.base) if who == BASELINE else (self.vhdxfs, self.env))
        if job in CONVERSIONS:
            ours, theirs, fmt, out, ref = CONVERSIONS[job]
            if who.startswith("qemu"):
                cache = ["-t", "writeback"] if who == "qemu-wb" else []
                ofmt = "raw" if out.endswith(".raw") else "vhdx"
                return (["qemu-img", "convert", *cache, "-f", fmt, "-O", ofmt, w / theirs, w / out], {}, w / out,
                        ref)
            return [*cmd, "convert", w / ours, w / out], kw, w / out, ref
        if job == "compact":
            return [*cmd, "compact", w / "c" / "half.vhdx"], kw, w / "c" / "half.vhdx", "half.vhdx"
        if who.startswith("qemu"):
            return ["qemu-img", "commit", "-q", w / "c" / "child.qcow2"], {}, w / "c" / "base.qcow2", "child.qcow2"
        return [*cmd, "commit", w / "c" / "child.avhdx"], kw, w / "c" / "src.vhdx", "child.qcow2"

    def setup(self, job: str, who: str) -> None:
        """Remove the outputs; fresh copies for compact and commit; the inputs read once more (other work on
        the machine evicts them from the page cache); then everything written is on the disk."""
        for name in ("out.raw", "out.vhdx"):
            (self.work / name).unlink(missing_ok=True)
        shutil.rmtree(self.work / "c", ignore_errors=True)
        if job in ("compact", "commit"):
            (self.work / "c").mkdir()
            names = ["half.vhdx"] if job == "compact" else (
                ["base.qcow2", "child.qcow2"] if who.startswith("qemu") else ["src.vhdx", "child.avhdx"])
            for name in names:
                run("cp", "--sparse=always", "--preserve=mode", self.work / name, self.work / "c" / name, timeout=1800)
        else:
            ours, theirs = CONVERSIONS[job][:2]
            source = theirs if who.startswith("qemu") else ours
            for name in [source, *CHAIN_BASES.get(source, [])]:
                _read(self.work / name)
        os.sync()

    def visit(self, job: str, who: str, verify: bool) -> dict[str, float]:
        argv, kw, output, ref = self.command(job, who)
        self.setup(job, who)
        env = kw.get("env")
        start = time.monotonic()
        proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env, cwd=kw.get("cwd"))
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
        err = proc.stderr.read().decode() if proc.stderr else ""
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise Unavailable(f"{job}/{who} failed ({proc.returncode}): {err.strip()[-300:]}")
        sample = {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "allocated": output.stat().st_blocks * 512}
        if verify:
            fmt = {".raw": "raw", ".vhdx": "vhdx", ".qcow2": "qcow2", ".avhdx": "vhdx"}
            same = run("qemu-img", "compare", "-q", "-f", fmt[output.suffix], "-F", fmt[Path(ref).suffix],
                       output, self.work / ref, check=False, timeout=1800)
            if same.returncode != 0:
                raise Unavailable(f"{job}/{who}: the output differs from {ref} ({same.stdout.strip()})")
        return sample

    def run(self) -> None:
        self.disks = build(self.work, parse_size(self.args.size), parse_size(self.args.data), self.args.jobs,
                           self.vhdxfs, self.env)
        for job in self.args.jobs:
            names = self.contenders(job)
            order = (names + names[::-1]) * self.args.rounds
            samples = self.results.setdefault(job, {who: [] for who in names})
            for i, who in enumerate(order):
                if (job, who) in self.errors:
                    continue  # failed once: n/a
                try:
                    sample = self.visit(job, who, verify=i < len(names))
                except Unavailable as exc:
                    log(f"  {job} {who}: n/a ({exc})")
                    self.errors[(job, who)] = str(exc)
                    continue
                samples[who].append(sample)
                log(f"  {job:14} {who:12} {sample['wall_s']:7.2f} s  cpu {sample['cpu_s']:6.2f} s  "
                    f"{sample['allocated'] / (1 << 20):8.0f} MiB")


def _read(path: Path) -> None:
    """Read a file once: the page cache is warm for every visit."""
    with path.open("rb") as f:
        while f.read(16 << 20):
            pass


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def report(bench: Bench, elapsed: float) -> str:
    d = bench.disks
    lines = [f"Disk {d['size'] / GiB:g} GiB holding {d['data'] / GiB:.2f} GiB in {d['runs']} runs of 1-8 MiB; "
             f"{bench.args.rounds * 2} visits per contender (A B ... B A), medians with min–max.", ""]
    for job, by_who in bench.results.items():
        lines += [f"### {job}", "", "| contender | wall s | cpu s | output on the host, MiB | wall vs qemu-wb |",
                  "|---|---:|---:|---:|---:|"]
        ref = by_who.get("qemu-wb")
        for who, samples in by_who.items():
            if not samples:
                lines.append(f"| {who} | n/a: {bench.errors.get((job, who), 'no visit')} | | | |")
                continue
            wall = [s["wall_s"] for s in samples]
            ratio = f"{statistics.median(wall) / statistics.median(s['wall_s'] for s in ref):.2f}x" if ref else ""
            lines.append(f"| {who} | {spread(wall)} | {statistics.median(s['cpu_s'] for s in samples):.2f} | "
                         f"{statistics.median(s['allocated'] for s in samples) / (1 << 20):.0f} | {ratio} |")
        if job == "compact" and by_who.get("vhdxfs"):
            h = d["half"]
            scanned = h["blocks"] * h["block_size"]
            rate = scanned / statistics.median(s["wall_s"] for s in by_who["vhdxfs"]) / GiB
            lines.append(f"\n{h['blocks']} allocated blocks of {h['block_size'] >> 20} MiB, half of them zeros: "
                         f"{scanned / GiB:.2f} GiB scanned at {rate:.2f} GiB/s (median, whole command).")
        lines.append("")
    lines.append(f"The run took {elapsed / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/run-convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G", help="virtual size of the disks (default 4G)")
    ap.add_argument("--data", default="1.5G", help="data they hold (default 1.5G)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of A B B A (default 3: 6 visits each)")
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated, of {', '.join(JOBS)}")
    ap.add_argument("--baseline", metavar="DIR", help="add vhdxfs-base: vhdxfs run from the checkout DIR")
    ap.add_argument("--workdir", default="/var/tmp", help="where the disks go (default /var/tmp)")
    ap.add_argument("--results", default=str(HERE / "results"), help="where the JSON and Markdown go")
    args = ap.parse_args()
    args.jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    if bad := [j for j in args.jobs if j not in JOBS]:
        ap.error(f"unknown jobs {bad}; known: {', '.join(JOBS)}")
    if args.baseline:
        found = checkout(args.baseline, REPO)
        if isinstance(found, str):
            ap.error(f"--baseline: {found}")
        args.baseline = found
    if parse_size(args.data) >= parse_size(args.size):
        ap.error("--data must be smaller than --size")
    work = Path(tempfile.mkdtemp(prefix="vhdxfs-convert-", dir=args.workdir))
    start = time.monotonic()
    bench = Bench(args, work)
    try:
        bench.run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - start
    m = machine(args.workdir)
    text = report(bench, elapsed) + "\n" + machine_line(m) + "\n"
    print(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {"when": stamp, "args": {k: str(v) for k, v in vars(args).items()}, "machine": m,
              "versions": versions({}, args.baseline), "disks": bench.disks, "results": bench.results,
              "errors": {f"{job}/{who}": why for (job, who), why in bench.errors.items()}, "elapsed_s": elapsed}
    save_results(args.results, f"convert-{stamp}", record, text)
    return 0
