"""benchmarks/run-side-by-side: plain fio, vhdxfs and qemu-storage-daemon mounted at the same time.

The second harness of docs/performance.md (the first is benchmarks/run, harness/fuse.py): both daemons serve
their own copy of one image for the whole run, as a user would run them, and plain fio jobs visit them A B B A:

  qemu-img create -q -f vhdx img.vhdx SIZE; cp img.vhdx a.vhdx; cp img.vhdx b.vhdx
  vhdxfs mount a.vhdx va                                                     -> fio on va/a.raw
  touch q.raw; qemu-storage-daemon --blockdev driver=file,node-name=f,filename=b.vhdx \\
      --blockdev driver=vhdx,node-name=v,file=f \\
      --export type=fuse,id=e,node-name=v,mountpoint=q.raw,writable=on      -> fio on q.raw (QEMU's defaults)

Each run: fresh copies; `seq write 1M` over GiB 0 and over GiB 1 (--end_fsync=1) on both; then, direct=1
psync --size=1G, each job visiting vhdxfs, qsd, qsd, vhdxfs:
  alloc4k   --rw=randwrite --bs=4k --runtime=RT --time_based            (offset 0: allocated space)
  fsync32   the same with --fsync=32 --offset=NG, N a GiB no visit has touched yet on that image, so every
            visit allocates fresh blocks in an image that already holds several GiB.
Reported per run: each visit's IOPS and the ratio of the two contenders' medians; over runs, the median
ratio and the lowest. Saved under benchmarks/results/side-by-side-<timestamp>.{json,md}.
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

from .fuse_mounts import vhdxfs
from .jobs import fio
from .procs import (
    HERE,
    GiB,
    Unavailable,
    force_unmount,
    is_mounted,
    log,
    mounts_under,
    parse_size,
    run,
    spawn,
    stop,
    wait_for,
)
from .results import machine, save_results

CONTENDERS = ("vhdxfs", "qsd")
JOBS = ("alloc4k", "fsync32")


def start_qsd(image: Path, work: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """The issue's command line, QEMU's defaults otherwise (no cache or allow-other options)."""
    target = work / "q.raw"
    target.touch()
    proc = spawn(["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f,filename={image}",
                  "--blockdev", "driver=vhdx,node-name=v,file=f",
                  "--export", f"type=fuse,id=e,node-name=v,mountpoint={target},writable=on"], work / "qsd.log")
    wait_for(lambda: proc.poll() is not None or is_mounted(target), "qemu-storage-daemon's export")
    if proc.poll() is not None:
        raise Unavailable(f"qemu-storage-daemon: {(work / 'qsd.log').read_text().strip()}")
    return proc, target


def one_run(work: Path, size: str, runtime: int) -> dict[str, dict[str, list[float]]]:
    """Fresh images, both daemons up, fills, then the A B B A visits of both jobs: job -> who -> IOPS."""
    run("qemu-img", "create", "-q", "-f", "vhdx", work / "img.vhdx", size)
    shutil.copyfile(work / "img.vhdx", work / "a.vhdx")
    shutil.copyfile(work / "img.vhdx", work / "b.vhdx")
    next_gib = {who: 2 for who in CONTENDERS}  # GiB 0 and 1 are filled first
    results: dict[str, dict[str, list[float]]] = {job: {who: [] for who in CONTENDERS} for job in JOBS}
    with vhdxfs(work / "a.vhdx", work / "va") as va_raw:
        qsd_proc, q_raw = start_qsd(work / "b.vhdx", work)
        try:
            raw = {"vhdxfs": va_raw, "qsd": q_raw}
            for who in CONTENDERS:
                for gib in (0, 1):
                    fio(raw[who], dict(rw="write", bs="1M", size=GiB, offset=gib * GiB, end_fsync=1))
            os.sync()
            for job in JOBS:
                for who in CONTENDERS + CONTENDERS[::-1]:
                    spec = dict(rw="randwrite", bs="4k", size=GiB, runtime=runtime)
                    if job == "fsync32":
                        spec |= dict(fsync=32, offset=next_gib[who] * GiB)
                        next_gib[who] += 1
                    os.sync()
                    iops = fio(raw[who], spec)["iops"]
                    results[job][who].append(iops)
                    log(f"  {job:8} {who:7} {iops:9.0f} IOPS")
        finally:
            stop(qsd_proc)
            if is_mounted(q_raw):
                force_unmount(q_raw)
    return results


def ratio(results: dict[str, list[float]]) -> float:
    return statistics.median(results["vhdxfs"]) / statistics.median(results["qsd"])


def report(runs: list[dict[str, dict[str, list[float]]]], args: argparse.Namespace) -> str:
    lines = ["| job | run | vhdxfs visits (IOPS) | qsd visits (IOPS) | vhdxfs/qsd |", "|---|---:|---|---|---:|"]
    for job in JOBS:
        for i, r in enumerate(runs, 1):
            v, q = r[job]["vhdxfs"], r[job]["qsd"]
            lines.append(f"| {job} | {i} | {', '.join(f'{x:.0f}' for x in v)} | "
                         f"{', '.join(f'{x:.0f}' for x in q)} | {ratio(r[job]):.2f}x |")
    lines.append("")
    for job in JOBS:
        ratios = [ratio(r[job]) for r in runs]
        lines.append(f"- {job}: median ratio {statistics.median(ratios):.2f}x over {len(runs)} runs, "
                     f"lowest {min(ratios):.2f}x, highest {max(ratios):.2f}x")
    lines.append(f"\nImage {args.size}, {args.runtime} s per visit, fio direct=1 psync --size=1G.")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/run-side-by-side", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="independent runs, fresh images each (default 3)")
    ap.add_argument("--runtime", type=int, default=6, help="seconds per visit (default 6)")
    ap.add_argument("--size", default="8G", help="virtual size of the image (default 8G)")
    ap.add_argument("--workdir", default="/var/tmp", help="where the images go (default /var/tmp)")
    ap.add_argument("--results", default=str(HERE / "results"), help="where the JSON and Markdown go")
    args = ap.parse_args()
    if parse_size(args.size) < (2 + 2) * GiB:
        ap.error(f"--size {args.size}: too small; each contender needs 2 filled and 2 fresh GiB")
    runs = []
    for i in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix="vhdxfs-sbs-", dir=args.workdir))
        log(f"run {i + 1}/{args.runs} in {work}")
        try:
            runs.append(one_run(work, args.size, args.runtime))
        finally:
            for point in mounts_under(work):
                force_unmount(point)
            shutil.rmtree(work, ignore_errors=True)
    text = report(runs, args)
    print(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {"when": stamp, "args": vars(args), "machine": machine(args.workdir), "runs": runs}
    save_results(args.results, f"side-by-side-{stamp}", record, text)
    return 0

