"""Benchmarks of images in an S3 store (issue 22), against a one-node RADOS Gateway started for the run
(tests/s3/rgw.py) and stopped at the end:

- convert: a remote image holding ``--data`` GiB of data to a local raw file, ``vhdxfs convert s3://...``
  next to ``qemu-img convert`` through QEMU's curl driver (an HTTP URL to the same object, made public-read);
- fetched/read: the bytes the store sent (counted by the proxy of tests/s3/proxy.py) over the bytes a random
  4 KiB read workload read through the mount (fio, O_DIRECT), with the cache unit (4 KiB pages);
- latency: 4 KiB random reads through the mount (fio, O_DIRECT, QD 1), cold (first read of each place) and
  warm (the same places again, from the block cache).

Medians and spread (min-max) over ``--rounds``; run niced (benchmarks/run-s3 does). Clients: the S3 client
libraries' figures (import, ranged GET latency, concurrency) with ``--clients``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.s3.proxy import FaultProxy  # noqa: E402
from tests.s3.rgw import Rgw  # noqa: E402

MiB = 1 << 20


def vhdxfs_cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "vhdxfs.cli", *map(str, args)], capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        raise RuntimeError(f"vhdxfs {' '.join(map(str, args))}: {result.stderr}")
    return result


def make_image(path: Path, data_gib: float) -> None:
    """A dynamic image of twice ``data_gib`` GiB whose first half is data (random bytes, incompressible)."""
    import vhdxfs
    from vhdxfs.engine import ImageSpec, create_image

    size = int(data_gib * 2 * 1024) * MiB
    create_image(path, ImageSpec(size, block_size=32 * MiB))
    chunk = os.urandom(32 * MiB)
    with vhdxfs.open(path, "r+b") as f:
        for i, block in enumerate(range(size // (64 * MiB))):
            f.seek(block * 32 * MiB)
            f.write(chunk[i % 7:] + chunk[:i % 7])  # each block its own bytes


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"


def bench_convert(url: str, http_url: str, work: Path, rounds: int, env: dict[str, str]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"vhdxfs": [], "qemu-img": []}
    for _ in range(rounds):
        for name in ("vhdxfs", "qemu-img"):
            out = work / f"{name}.raw"
            out.unlink(missing_ok=True)
            t = time.perf_counter()
            if name == "vhdxfs":
                vhdxfs_cli("convert", url, out, env=env)
            else:
                # QEMU's curl driver (7.2) sometimes stops on connections the gateway has closed (CLOSE-WAIT,
                # no progress): its own timeout ends such a request, and a run that still hangs is retried.
                spec = json.dumps({"driver": "vhdx", "file": {"driver": "http", "url": http_url, "timeout": 20}})
                for attempt in range(3):
                    try:
                        subprocess.run(["qemu-img", "convert", "-O", "raw", f"json:{spec}", str(out)], check=True,
                                       env=env, timeout=300)
                        break
                    except subprocess.TimeoutExpired:
                        print(f"qemu-img convert hung (attempt {attempt + 1}); killed and run again", flush=True)
                        out.unlink(missing_ok=True)
                        t = time.perf_counter()
            times[name].append(time.perf_counter() - t)
            out.unlink()
    return times


def fio_randread(target: Path, *, ios: int, seed: int, size: int) -> dict[str, float]:
    out = subprocess.run(
        ["fio", "--output-format=json", f"--filename={target}", "--name=r", "--rw=randread", "--bs=4k",
         "--direct=1", "--ioengine=psync", "--iodepth=1", f"--number_ios={ios}", f"--randseed={seed}",
         "--randrepeat=1", f"--size={size}"], capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    pct = job["clat_ns"]["percentile"]
    return {"ios": job["total_ios"], "bytes": job["io_bytes"], "p50_us": pct["50.000000"] / 1e3,
            "p90_us": pct["90.000000"] / 1e3, "p99_us": pct["99.000000"] / 1e3,
            "mean_us": job["clat_ns"]["mean"] / 1e3}


def bench_mount(url: str, proxy: FaultProxy, work: Path, rounds: int, env: dict[str, str], data: int) -> list[dict]:
    results = []
    for r in range(rounds):
        point = work / "mnt"
        point.mkdir(exist_ok=True)
        penv = dict(env, AWS_ENDPOINT_URL=proxy.endpoint)
        vhdxfs_cli("mount", "-o", "ro", url, point, env=penv)
        try:
            raw = next(point.iterdir())
            before = proxy.bytes_out
            cold = fio_randread(raw, ios=2000, seed=100 + r, size=data)
            fetched = proxy.bytes_out - before
            warm = fio_randread(raw, ios=2000, seed=100 + r, size=data)
            results.append({"cold": cold, "warm": warm, "fetched": fetched,
                            "fetched_over_read": fetched / cold["bytes"]})
        finally:
            vhdxfs_cli("umount", point, env=penv)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/run-s3", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=float, default=2.0, help="GiB of data in the converted image (default 2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", action="store_true", help="also measure the S3 client libraries")
    ap.add_argument("--skip-convert", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vhdxfs-s3-bench-", dir="/var/tmp"))
    rgw = Rgw(work / "rgw", memstore_bytes=int((args.data * 2.5 + 1) * 1024) * MiB)
    (work / "rgw").mkdir()
    rgw.start()
    print(f"RADOS Gateway answering in {rgw.started_in:.1f} s at {rgw.endpoint}", flush=True)
    env = dict(os.environ, **rgw.env())
    os.environ.update(rgw.env())
    proxy = None
    try:
        import botocore.session

        s3 = botocore.session.get_session().create_client("s3", endpoint_url=rgw.endpoint)
        s3.create_bucket(Bucket=rgw.bucket)
        from vhdxfs.engine import parse_location, upload_file

        image = work / "golden.vhdx"
        make_image(image, args.data)
        key = "golden.vhdx"
        t = time.perf_counter()
        upload_file(parse_location(f"s3://{rgw.bucket}/{key}"), image)
        print(f"upload (multipart) of {image.stat().st_size / MiB:.0f} MiB: {time.perf_counter() - t:.1f} s",
              flush=True)
        s3.put_object_acl(Bucket=rgw.bucket, Key=key, ACL="public-read")
        url, http_url = f"s3://{rgw.bucket}/{key}", f"{rgw.endpoint}/{rgw.bucket}/{key}"
        if args.clients:
            from .s3_clients import main as clients

            clients(rgw.bucket, key, image.stat().st_size)
        if not args.skip_convert:
            times = bench_convert(url, http_url, work, args.rounds, env)
            for name, values in times.items():
                rate = [args.data * 1024 / v for v in values]
                print(f"convert {name}: {spread(values)} s; {spread(rate)} MiB/s of data", flush=True)
            ratio = statistics.median(times["qemu-img"]) / statistics.median(times["vhdxfs"])
            print(f"convert: vhdxfs is {ratio:.2f}x qemu-img's speed (goal >= 1.0x)", flush=True)
        host, port = rgw.endpoint.removeprefix("http://").split(":")
        proxy = FaultProxy(host, int(port)).start()
        runs = bench_mount(url, proxy, work, args.rounds, env, int(args.data * 1024) * MiB)
        ratios = [r["fetched_over_read"] for r in runs]
        print(f"random 4 KiB reads (2000 per round, cache unit 4 KiB pages): fetched/read {spread(ratios)}",
              flush=True)
        for phase in ("cold", "warm"):
            for q in ("p50_us", "p90_us", "p99_us"):
                print(f"latency {phase} {q}: {spread([r[phase][q] for r in runs])} us", flush=True)
    finally:
        if proxy is not None:
            proxy.stop()
        rgw.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0
