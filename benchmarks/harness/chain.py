"""benchmarks/run-chain: reading through a chain of checkpoints next to reading one image of the same contents.

The disk (the issue "A chain of twenty checkpoints reads as fast as one image"): an 8 GiB base with 2 MiB
blocks and N differencing children (default 20), each layer writing 4 MiB of its own and 1 MiB over the
layer below; the same contents flattened into one image (`vhdxfs convert`). Both are read through the
mount (dd 1 MiB O_DIRECT and 128 KiB buffered over the first 2 GiB, fio 4 KiB random reads) and over NBD
(fio's nbd engine: 1 MiB and 4 KiB random reads at depth 16); visits alternate (chain, single, single,
chain per round) and the table gives medians and the chain/single ratio of times or rates. --whole adds the
whole disk read through the mount next to libvhdi's vhdimount. --open measures opening a chain of N
children over a 64 TiB base (time and peak memory of a process that opens it and reads one block).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .fuse_mounts import vhdimount, vhdxfs
from .jobs import Job, fio, nbd_target, parse_fio
from .nbd_servers import vhdxfs_server
from .procs import PYTHON, REPO, GiB, MiB, log, on_signal, run, vhdxfs_bin
from .results import save_results

SIZE = 8 * GiB
SPAN = 2 * GiB


def build(work: Path, layers: int) -> tuple[Path, Path]:
    """The chain (its top) and the single image of the same contents."""
    script = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from vhdxfs.engine import Disk, ImageSpec, create_child, create_image
MiB = 1 << 20
base = {str(work / "base.vhdx")!r}
create_image(base, ImageSpec({SIZE}, block_size=2 * MiB))
paths = [base]
for i in range({layers} + 1):
    if i:
        paths.append({str(work)!r} + f"/layer{{i:02}}.avhdx")
        create_child(paths[-1], paths[-2])
    with Disk.open(paths[-1]) as disk:
        own = i * 96 * MiB
        disk.write(own, bytes([i + 1]) * 4 * MiB)
        if i:
            disk.write(own - 96 * MiB + MiB, bytes([i + 101]) * MiB)
print(paths[-1])
"""
    top = Path(run(PYTHON, "-c", script, timeout=1200).stdout.strip())
    single = work / "single.vhdx"
    run(vhdxfs_bin(), "convert", top, single, timeout=1200)
    return top, single


def timed(*args: object) -> float:
    started = time.monotonic()
    run(*args, timeout=1200)
    return time.monotonic() - started


def fuse_visit(image: Path, mnt: Path) -> dict[str, float]:
    with vhdxfs(image, mnt) as raw:
        out = {"dd 1M direct, 2 GiB (s)": timed("dd", f"if={raw}", "of=/dev/null", "bs=1M", f"count={SPAN // MiB}",
                                                "iflag=direct"),
               "dd 128k buffered, 2 GiB (s)": timed("dd", f"if={raw}", "of=/dev/null", "bs=128k",
                                                    f"count={SPAN // (128 << 10)}")}
        job: Job = {"name": "rand read 4k", "rw": "randread", "bs": "4k", "size": SPAN, "runtime": 8}
        out["fio 4k random read QD1 (IOPS)"] = fio(raw, job)["iops"]
    return out


def nbd_visit(image: Path, work: Path) -> dict[str, float]:
    sock = work / f"{image.stem}.sock"
    out = {}
    with vhdxfs_server("vhdxfs", image, sock, SIZE):
        for name, bs, rw in (("nbd 1M read QD16 (MiB/s)", "1M", "read"), ("nbd 4k random read QD16 (IOPS)", "4k",
                                                                         "randread")):
            job: Job = {"name": name, "rw": rw, "bs": bs, "size": SPAN, "iodepth": 16, "runtime": 8}
            args = ["fio", "--output-format=json", *nbd_target(sock), "--name=job", f"--rw={rw}", f"--bs={bs}",
                    "--iodepth=16", f"--size={SPAN}", "--runtime=8", "--time_based"]
            sample = parse_fio(run(*args, timeout=300).stdout, job)
            out[name] = sample["iops"] if bs == "4k" else sample["mib_s"]
    return out


def whole_disk(top: Path, work: Path) -> dict[str, float]:
    out = {}
    with vhdxfs(top, work / "mnt-whole") as raw:
        out["vhdxfs: whole 8 GiB, dd 1M (s)"] = timed("dd", f"if={raw}", "of=/dev/null", "bs=1M", "iflag=direct")
    with vhdimount(top, work) as raw:
        out["vhdimount: whole 8 GiB, dd 1M (s)"] = timed("dd", f"if={raw}", "of=/dev/null", "bs=1M")
    return out


def open_big(work: Path, layers: int) -> dict[str, float]:
    """A chain of ``layers`` 2 MiB-block children over a 64 TiB base, opened by a fresh process."""
    script = f"""
import resource, sys, time
sys.path.insert(0, {str(REPO)!r})
from vhdxfs.engine import Disk, ImageSpec, create_child, create_image
paths = [{str(work / "big.vhdx")!r}]
create_image(paths[0], ImageSpec(64 << 40))
for i in range({layers}):
    paths.append({str(work)!r} + f"/big{{i:02}}.avhdx")
    create_child(paths[-1], paths[-2])
print(paths[-1])
"""
    top = run(PYTHON, "-c", script, timeout=1200).stdout.strip()
    probe = f"""
import resource, sys, time
sys.path.insert(0, {str(REPO)!r})
started = time.monotonic()
from vhdxfs.engine import Disk
with Disk.open({top!r}, read_only=True) as disk:
    disk.read(5 << 40, 4096)
    print(time.monotonic() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    times, rss = [], []
    for _ in range(5):
        seconds, peak = map(float, run(PYTHON, "-c", probe).stdout.split())
        times.append(seconds)
        rss.append(peak)
    return {"open 64 TiB chain + one read (s)": statistics.median(times), "its peak RSS (MiB)": max(rss)}


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run-chain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20, help="children over the base (default 20)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of visits chain, single, single, chain")
    parser.add_argument("--whole", action="store_true", help="also read the whole disk, vhdxfs and vhdimount")
    parser.add_argument("--open", action="store_true", help="also open a 64 TiB chain (time, peak memory)")
    parser.add_argument("--workdir", default="/var/tmp", help="where the images go (default /var/tmp)")
    parser.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = parser.parse_args()
    import signal
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, on_signal)
    work = Path(tempfile.mkdtemp(prefix="vhdxfs-chain-", dir=args.workdir))
    log(f"building a chain of {args.layers} children and its single image in {work}")
    top, single = build(work, args.layers)
    samples: dict[str, dict[str, list[float]]] = {"chain": {}, "single": {}}
    for r in range(args.rounds):
        for who in ("chain", "single", "single", "chain"):
            image = top if who == "chain" else single
            log(f"round {r + 1}: {who}")
            for key, value in {**fuse_visit(image, work / f"mnt-{who}"), **nbd_visit(image, work)}.items():
                samples[who].setdefault(key, []).append(value)
    extra: dict[str, Any] = {}
    if args.whole:
        extra.update(whole_disk(top, work))
    if args.open:
        extra.update(open_big(work, args.layers))
    lines = [f"# Reading through {args.layers} checkpoints ({args.rounds} rounds; medians, min-max)", "",
             "| measure | chain | single image | chain/single (cost) |", "|---|---:|---:|---:|"]
    for key in samples["chain"]:
        c, s = samples["chain"][key], samples["single"][key]
        cost = statistics.median(c) / statistics.median(s) if "(s)" in key else \
            statistics.median(s) / statistics.median(c)
        lines.append(f"| {key} | {statistics.median(c):.2f} ({min(c):.2f}-{max(c):.2f}) | "
                     f"{statistics.median(s):.2f} ({min(s):.2f}-{max(s):.2f}) | {cost:.2f}x |")
    lines += ["", *(f"- {key}: {value:.2f}" for key, value in extra.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    save_results(args.results, time.strftime("%Y%m%d-%H%M%S-chain"),
                 {"samples": samples, "extra": extra, "layers": args.layers}, text)
    run("rm", "-rf", work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
