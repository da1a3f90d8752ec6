"""benchmarks/run-live: what live operations cost the disk's users (the issue "Manage a running disk").

- pause: fio 4 KiB random writes at queue depth 1 (O_DIRECT) on the mount while `vhdxfs checkpoint` runs
  every --interval seconds; fio's longest completion latency next to the same job without checkpoints
  (goal: under 50 ms);
- merge under load: a top holding --merge-size of its own data (written after a checkpoint), merged with
  `vhdxfs merge` while fio runs 4 KiB random reads and writes at queue depth 8; fio's rate next to the same
  job with no merge (goal: at least half), and the merge's time;
- merge speed: the same merge with no load, in MiB/s, next to the offline `vhdxfs commit` of the same
  layer (stopped disk).

Every figure is repeated --rounds times, with and without alternating; the table gives medians and spreads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .fuse_mounts import vhdxfs
from .procs import MiB, log, run, vhdxfs_bin
from .results import save_results

SIZE = 4 << 30


def fio_json(raw: Path, *args: str) -> dict[str, Any]:
    out = run("fio", "--output-format=json", f"--filename={raw}", "--name=job", "--direct=1", "--ioengine=libaio",
              "--group_reporting", "--randrepeat=0", *args, timeout=900).stdout
    return dict(json.loads(out[out.index("{"):])["jobs"][0])


def cli(*args: object) -> str:
    return run(vhdxfs_bin(), *args, timeout=900).stdout


def fresh(work: Path, name: str) -> Path:
    image = work / f"{name}.vhdx"
    image.unlink(missing_ok=True)
    for stale in work.glob(f"{name}_*.avhdx"):
        stale.unlink()
    (work / f"{name}.vhdx.chain").unlink(missing_ok=True)
    run("qemu-img", "create", "-q", "-f", "vhdx", image, str(SIZE))
    return image


def pause(work: Path, seconds: float, interval: float, checkpoints: bool) -> float:
    """fio's longest 4 KiB write latency (ms) at QD1, with a checkpoint every ``interval`` s or none."""
    image = fresh(work, "pause")
    with vhdxfs(image, work / "mnt-pause") as raw:
        fio_json(raw, "--rw=write", "--bs=1M", "--size=1G", "--iodepth=16")  # allocated space to write into
        stop = threading.Event()

        def operator() -> None:
            while not stop.wait(interval):
                cli("checkpoint", raw)

        thread = threading.Thread(target=operator)
        if checkpoints:
            thread.start()
        job = fio_json(raw, "--rw=randwrite", "--bs=4k", "--size=1G", "--iodepth=1", f"--runtime={seconds}",
                       "--time_based")
        stop.set()
        if checkpoints:
            thread.join()
    return float(job["write"]["clat_ns"]["max"]) / 1e6


def merge_under_load(work: Path, merge_size: int, seconds: float, merging: bool) -> tuple[float, float]:
    """(fio's IOPS, the merge's seconds) with the active top merged meanwhile, or (IOPS, 0) without."""
    image = fresh(work, "merge")
    with vhdxfs(image, work / "mnt-merge") as raw:
        top = Path(cli("checkpoint", raw).strip())
        fio_json(raw, "--rw=write", "--bs=1M", f"--size={merge_size}", "--iodepth=16")
        took: list[float] = []

        def operator() -> None:
            started = time.monotonic()
            cli("merge", raw, top.name)
            took.append(time.monotonic() - started)

        thread = threading.Thread(target=operator)
        if merging:
            thread.start()
        job = fio_json(raw, "--rw=randrw", "--bs=4k", f"--size={merge_size}", "--iodepth=8",
                       f"--runtime={seconds}", "--time_based")
        if merging:
            thread.join()
    iops = float(job["read"]["iops"]) + float(job["write"]["iops"])
    return iops, (took[0] if took else 0.0)


def merge_speed(work: Path, merge_size: int) -> tuple[float, float]:
    """(live merge MiB/s with no load, offline commit MiB/s) of a top holding ``merge_size`` bytes."""
    image = fresh(work, "speed")
    with vhdxfs(image, work / "mnt-speed") as raw:
        top = Path(cli("checkpoint", raw).strip())
        fio_json(raw, "--rw=write", "--bs=1M", f"--size={merge_size}", "--iodepth=16")
        run("sync")
        started = time.monotonic()
        cli("merge", raw, top.name)
        live = merge_size / MiB / (time.monotonic() - started)
    image = fresh(work, "speed")
    with vhdxfs(image, work / "mnt-speed") as raw:
        top = Path(cli("checkpoint", raw).strip())
        fio_json(raw, "--rw=write", "--bs=1M", f"--size={merge_size}", "--iodepth=16")
    run("sync")
    (work / "speed.vhdx.chain").unlink(missing_ok=True)  # commit writes the base itself: the chain is ours
    started = time.monotonic()
    cli("commit", top)
    offline = merge_size / MiB / (time.monotonic() - started)
    return live, offline


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run-live", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20, help="fio's time per job (default 20)")
    parser.add_argument("--interval", type=float, default=2, help="seconds between checkpoints (default 2)")
    parser.add_argument("--merge-size", type=int, default=1024, help="MiB the merged top holds (default 1024)")
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vhdxfs-live-", dir=args.workdir))
    size = args.merge_size * MiB
    figures: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for checkpoints in (True, False) if r % 2 == 0 else (False, True):
            every = f"every {args.interval:g} s" if checkpoints else "none"
            log(f"round {r + 1}: QD1 writes, checkpoints {every}")
            key = "QD1 4k write, longest latency (ms), " + ("checkpoints" if checkpoints else "none")
            figures.setdefault(key, []).append(pause(work, args.seconds, args.interval, checkpoints))
        for merging in (True, False) if r % 2 == 0 else (False, True):
            log(f"round {r + 1}: 4k randrw QD8, {'merging the active top' if merging else 'no merge'}")
            iops, took = merge_under_load(work, size, args.seconds, merging)
            figures.setdefault("4k randrw QD8 (IOPS), " + ("merging" if merging else "no merge"), []).append(iops)
            if merging:
                figures.setdefault("merge under load (s)", []).append(took)
        log(f"round {r + 1}: merge speed, live and offline")
        live, offline = merge_speed(work, size)
        figures.setdefault("live merge, idle (MiB/s)", []).append(live)
        figures.setdefault("offline commit (MiB/s)", []).append(offline)
    lines = [f"# Live operations ({args.rounds} rounds; median (min-max))", "", "| measure | value |", "|---|---:|"]
    lines += [f"| {key} | {summary(values)} |" for key, values in figures.items()]
    under = statistics.median(figures["4k randrw QD8 (IOPS), merging"])
    alone = statistics.median(figures["4k randrw QD8 (IOPS), no merge"])
    lines += ["", f"fio during an active merge of {args.merge_size} MiB: {under / alone:.2f}x the same job alone."]
    text = "\n".join(lines) + "\n"
    print(text)
    save_results(args.results, time.strftime("%Y%m%d-%H%M%S-live"), {"figures": figures, "args": vars(args)}, text)
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
