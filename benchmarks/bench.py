"""benchmarks/run: fio against MOUNT/*.raw for vhdxfs, qemu-storage-daemon, vhdimount and a passthrough.

Every contender gets its own copy of one fresh dynamic image made by qemu-img (the passthrough a sparse
raw file of the same size). Jobs run with direct=1 (as a VM with cache=none), contenders interleaved
A B C C B A so drift cancels; the table gives MiB/s (IOPS for 4k jobs) and ratios against qsd and the
passthrough ceiling. Results are also written as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV = REPO / ".venv" / "bin"
GiB = 1 << 30


def parse_size(text: str) -> int:
    return int(text[:-1]) << {"K": 10, "M": 20, "G": 30, "T": 40}[text[-1]] if text[-1].isalpha() else int(text)


def sh(*args, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True, **kw)


def wait_for(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- contenders: each is a context manager yielding the raw file to benchmark ------------------------------
@contextmanager
def vhdxfs(image: Path, work: Path):
    mnt = work / "mnt-vhdxfs"
    mnt.mkdir(exist_ok=True)
    sh(VENV / "vhdxfs", "mount", image, mnt)
    try:
        yield mnt / (image.stem + ".raw")
    finally:
        sh(VENV / "vhdxfs", "umount", mnt, check=False)


def vhdxfs_pid(mnt: Path) -> int | None:
    sys.path.insert(0, str(REPO))
    from vhdxfs.mount.daemon import state_file

    try:
        return int(state_file(mnt).read_text().split()[0])
    except OSError:
        return None


@contextmanager
def qsd(image: Path, work: Path):
    target = work / "qsd.raw"
    target.touch()
    proc = subprocess.Popen(["qemu-storage-daemon",
                             "--blockdev", f"driver=file,node-name=file,filename={image},cache.direct=off",
                             "--blockdev", "driver=vhdx,node-name=disk,file=file",
                             "--export", f"type=fuse,id=exp,node-name=disk,mountpoint={target},writable=on"],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: proc.poll() is not None or target.stat().st_size > 0, "qemu-storage-daemon")
        if proc.poll() is not None:
            raise RuntimeError(f"qemu-storage-daemon: {proc.stderr.read().strip()}")
        yield target
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@contextmanager
def vhdimount(image: Path, work: Path):
    mnt = work / "mnt-vhdi"
    mnt.mkdir(exist_ok=True)
    sh("vhdimount", image, mnt)
    try:
        yield mnt / "vhdi1"
    finally:
        sh("fusermount3", "-u", mnt, check=False)


@contextmanager
def passthrough(raw: Path, work: Path):
    mnt = work / "mnt-pt"
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen([VENV / "python", HERE / "passthrough.py", raw, mnt], env=dict(os.environ,
                            PYTHONPATH=str(REPO)))
    try:
        wait_for(lambda: os.path.ismount(mnt) or proc.poll() is not None, "passthrough")
        yield mnt / "disk.raw"
    finally:
        sh("fusermount3", "-u", mnt, check=False)
        proc.wait(timeout=60)


# -- jobs ------------------------------------------------------------------------------------------------
def jobs(quick: bool) -> list[dict]:
    span = "256M" if quick else "2G"
    t = "4" if quick else "15"
    return [
        dict(name="seq write 1M, fresh space", rw="write", bs="1M", size=span, fresh=True, writes=True),
        dict(name="seq write 1M, allocated", rw="write", bs="1M", size=span, writes=True),
        dict(name="seq read 1M", rw="read", bs="1M", size=span),
        dict(name="rand read 4k", rw="randread", bs="4k", size=span, runtime=t),
        dict(name="rand write 4k", rw="randwrite", bs="4k", size=span, runtime=t, writes=True),
        dict(name="rand read 4k x4 jobs", rw="randread", bs="4k", size=span, runtime=t, numjobs=4),
        dict(name="rand write 4k fsync/32, fresh", rw="randwrite", bs="4k", size=span, runtime=t, fsync=32,
             fresh=True, writes=True, offset=span),
    ]


def fio(raw: Path, job: dict) -> float:
    args = ["fio", "--output-format=json", "--direct=1", "--ioengine=psync", f"--filename={raw}",
            "--name=job", f"--rw={job['rw']}", f"--bs={job['bs']}", f"--size={job['size']}", "--group_reporting"]
    if "runtime" in job:
        args += [f"--runtime={job['runtime']}", "--time_based"]
    if "numjobs" in job:
        args += [f"--numjobs={job['numjobs']}"]
    if "fsync" in job:
        args += [f"--fsync={job['fsync']}"]
    if "offset" in job:
        args += [f"--offset={job['offset']}"]
    out = json.loads(sh(*args).stdout)["jobs"][0]
    side = out["write"] if "write" in job["rw"] else out["read"]
    return side["iops"] if job["bs"] == "4k" else side["bw"] / 1024  # IOPS, or MiB/s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="8G", help="virtual size of the test image (default 8G)")
    ap.add_argument("--quick", action="store_true", help="small spans and short runs: a smoke test")
    ap.add_argument("--rounds", type=int, default=1, help="A B C C B A passes (default 1: each contender twice)")
    ap.add_argument("--workdir", default="/var/tmp", help="where the images go (default /var/tmp)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vhdxfs-bench-", dir=args.workdir))
    base = work / "base.vhdx"
    sh("qemu-img", "create", "-f", "vhdx", base, args.size)
    size = json.loads(sh("qemu-img", "info", "--output=json", base).stdout)["virtual-size"]

    def fresh_image(name: str) -> Path:
        path = work / f"{name}.vhdx"
        shutil.copyfile(base, path)
        return path

    def fresh_raw() -> Path:
        path = work / "pt.img"
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    contenders = {
        "vhdxfs": lambda: vhdxfs(fresh_image("disk"), work),
        "qsd": lambda: qsd(fresh_image("qsd"), work),
        "passthrough": lambda: passthrough(fresh_raw(), work),
    }
    results: dict[str, dict[str, list[float]]] = {}
    order = list(contenders) + list(reversed(contenders))
    errors: dict[str, str] = {}
    try:
        # vhdimount only reads: its copy is filled by QEMU, 256 MiB per request (qemu-io's limit is below 2G).
        readonly_image = fresh_image("vhdi")
        span = parse_size(jobs(args.quick)[0]["size"])
        fill = [arg for off in range(0, span, 256 << 20) for arg in ("-c", f"write -P 0x5a {off} {256 << 20}")]
        sh("qemu-io", "-f", "vhdx", *fill, readonly_image)
        for _ in range(args.rounds):
            for name in order:
                try:
                    run_contender(name, contenders[name], args.quick, results)
                except Exception as exc:  # a contender that cannot run is reported, the others go on
                    errors[name] = str(exc)
            try:
                with vhdimount(readonly_image, work) as raw:
                    for job in jobs(args.quick):
                        if not job.get("writes"):
                            results.setdefault("vhdimount", {}).setdefault(job["name"], []).append(fio(raw, job))
            except Exception as exc:
                errors["vhdimount"] = str(exc)
        extra = footprint(work, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, errors, extra, args)
    return 0


def run_contender(name: str, make, quick: bool, results: dict) -> None:
    ctx = make()
    with ctx as raw:
        for job in jobs(quick):
            if job.get("fresh") and job["rw"] != "write":
                continue  # the fresh random-write job runs on its own copy below
            results.setdefault(name, {}).setdefault(job["name"], []).append(fio(raw, job))
    with make() as raw:
        job = jobs(quick)[-1]
        results[name].setdefault(job["name"], []).append(fio(raw, job))


def footprint(work: Path, quick: bool) -> dict:
    """Peak RSS of the daemon with a 64 TiB image open, and open times of vhdxfs info vs qemu-img info."""
    big = work / "big.vhdx"
    sh("qemu-img", "create", "-f", "vhdx", big, "64T")
    out: dict = {}
    mnt = work / "mnt-big"
    mnt.mkdir()
    sh(VENV / "vhdxfs", "mount", big, mnt)
    try:
        pid = vhdxfs_pid(mnt)
        with open(mnt / "big.raw", "rb") as f:
            for off in range(0, 64 << 40, 1 << 40):
                f.seek(off)
                f.read(65536)
        status = Path(f"/proc/{pid}/status").read_text()
        out["peak_rss_mib"] = int(next(line.split()[1] for line in status.splitlines()
                                       if line.startswith("VmHWM"))) / 1024
    finally:
        sh(VENV / "vhdxfs", "umount", mnt, check=False)
    for name, cmd in (("vhdxfs info", [VENV / "vhdxfs", "info", big]), ("qemu-img info", ["qemu-img", "info", big])):
        times = []
        for _ in range(3 if quick else 7):
            t = time.perf_counter()
            sh(*cmd)
            times.append(time.perf_counter() - t)
        out[f"{name} s"] = statistics.median(times)
    return out


def report(results: dict, errors: dict, extra: dict, args) -> None:
    names = [j["name"] for j in jobs(args.quick)]
    cols = [c for c in ("vhdxfs", "qsd", "vhdimount", "passthrough") if c in results]
    med = {c: {j: statistics.median(v) for j, v in results[c].items()} for c in cols}
    lines = ["| job | unit | " + " | ".join(cols) + " | vhdxfs/qsd | vhdxfs/ceiling |",
             "|---|---|" + "---|" * len(cols) + "---|---|"]
    for job in names:
        unit = "IOPS" if "4k" in job else "MiB/s"
        cells = [f"{med[c][job]:.0f}" if job in med[c] else "n/a" for c in cols]
        v, q, p = (med.get(c, {}).get(job) for c in ("vhdxfs", "qsd", "passthrough"))
        r1 = f"{v / q:.2f}x" if v and q else "n/a"
        r2 = f"{v / p:.2f}x" if v and p else "n/a"
        lines.append(f"| {job} | {unit} | " + " | ".join(cells) + f" | {r1} | {r2} |")
    machine = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Linux {platform.release()}"
    text = "\n".join(lines)
    text += (f"\n\nImage {args.size}, {'quick' if args.quick else 'full'} run, {args.rounds} round(s); {machine}.\n"
             f"vhdxfs daemon peak RSS with a 64 TiB image open: {extra.get('peak_rss_mib', 0):.1f} MiB; "
             f"open time of a 64 TiB image: vhdxfs info {extra.get('vhdxfs info s', 0):.3f} s, "
             f"qemu-img info {extra.get('qemu-img info s', 0):.3f} s.\n")
    for name, err in errors.items():
        text += f"\n{name}: n/a ({err})"
    print(text)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{stamp}.json").write_text(json.dumps({"results": results, "errors": errors, "extra": extra,
                                                   "machine": machine, "size": args.size, "quick": args.quick},
                                                  indent=2))
    (out / f"{stamp}.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
