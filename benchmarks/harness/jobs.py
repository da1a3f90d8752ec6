"""The fio jobs of both front ends, how --jobs and --profile pick among them, and fio's command and figures.

One definition for both, so that the FUSE and the NBD harness measure the same things the same way: the
same span (the first job writes it, every later job reads or rewrites it), the same timed runtime, the same
selection rule and the same headline figure (IOPS for 4 KiB jobs, MiB/s otherwise). What differs is only
what a front end can express: FUSE jobs run psync with O_DIRECT on the raw file (one request in flight per
fio job, as a VM with cache=none), NBD jobs set a queue depth on fio's nbd engine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .procs import GiB, MiB, Unavailable, run

Job = dict[str, Any]  # name, rw, bs, size; optional offset, runtime, numjobs, iodepth, fsync, fills, fresh


def span_of(quick: bool, image_size: int) -> int:
    """How much of the disk a job touches: 2 GiB (256 MiB quick), at most a quarter of the image (whole MiB):
    the jobs into fresh space need room above the span the first job writes."""
    return min(256 * MiB if quick else 2 * GiB, image_size // 4 // MiB * MiB)


def default_runtime(quick: bool) -> float:
    """Seconds of each timed job: the random jobs dominate a visit."""
    return 4 if quick else 12


def job(name: str, rw: str, bs: str, size: int, **kw: Any) -> Job:
    """A job; `writes` (derived from rw) marks it for read-only contenders (vhdimount) to skip."""
    return {"name": name, "rw": rw, "bs": bs, "size": size, **kw, "writes": "write" in rw}


def fuse_jobs(quick: bool, image_size: int, runtime: float | None = None) -> list[Job]:
    """benchmarks/run's jobs (psync, one request in flight per fio job), in the order one visit runs them."""
    span, t = span_of(quick, image_size), runtime or default_runtime(quick)
    return [
        # Writes 1 MiB blocks into never-written space: vhdxfs and qsd allocate payload blocks and grow the
        # file (the passthrough's host file system allocates too). Runs first, on the visit's fresh copy.
        job("seq write 1M, fresh", "write", "1M", span, fills=True),
        # The same span again: every block is allocated now, pure data path.
        job("seq write 1M, allocated", "write", "1M", span),
        job("seq read 1M", "read", "1M", span),
        job("rand read 4k", "randread", "4k", span, runtime=t),
        # Into the span the first job allocated: no allocation, the pure 4 KiB data path.
        job("rand write 4k", "randwrite", "4k", span, runtime=t),
        # Four threads at once: how well requests overlap (queue depth 4 through FUSE).
        job("rand read 4k, 4 jobs", "randread", "4k", span, runtime=t, numjobs=4),
        # What users of a long-lived image see: a journaling guest allocating in an image that already
        # holds data (the span above), the untouched span above it. Every visit has its own fresh copy, so
        # every visit finds that span untouched.
        job("rand write 4k fsync/32, filled image", "randwrite", "4k", span, offset=span, runtime=t, fsync=32),
        # A journaling guest: an fsync every 32 writes, into fresh space (allocation + metadata flushes).
        # Runs on a second fresh copy, in the span above the first one.
        job("rand write 4k fsync/32, fresh", "randwrite", "4k", span, offset=span, runtime=t, fsync=32,
            fresh=True),
    ]


def nbd_jobs(quick: bool, image_size: int, runtime: float | None = None) -> list[Job]:
    """benchmarks/run-nbd's jobs (fio's nbd engine, QD1 and QD16), in the order one visit runs them."""
    span, t = span_of(quick, image_size), runtime or default_runtime(quick)
    return [
        # Into never-written space: allocates the payload blocks and grows the image. Fills the span.
        job("seq write 1M QD16, fresh", "write", "1M", span, iodepth=16, fills=True),
        job("seq write 1M QD16, allocated", "write", "1M", span, iodepth=16),
        job("seq read 1M QD16", "read", "1M", span, iodepth=16, runtime=t),
        job("rand read 4k QD1", "randread", "4k", span, iodepth=1, runtime=t),
        job("rand read 4k QD16", "randread", "4k", span, iodepth=16, runtime=t),
        # Four fio jobs, each its own NBD connection, 16 requests in flight on each.
        job("rand read 4k 4 jobs QD16", "randread", "4k", span, iodepth=16, numjobs=4, runtime=t),
        job("rand write 4k QD1", "randwrite", "4k", span, iodepth=1, runtime=t),
        job("rand write 4k QD16", "randwrite", "4k", span, iodepth=16, runtime=t),
    ]


JOBS: dict[str, Callable[..., list[Job]]] = {"fuse": fuse_jobs, "nbd": nbd_jobs}


def select(all_jobs: list[Job], patterns: list[str] | None) -> list[Job]:
    """--jobs and --profile: a pattern equal to a job's name (any case) picks that job; otherwise every job
    whose name contains it. In the jobs' usual order. The exact match is what lets 'rand read 4k QD1' name
    one job although 'rand read 4k QD16' contains it; 'rand read' still picks every random read."""
    if not patterns:
        return all_jobs
    names = {j["name"].lower() for j in all_jobs}
    picked: set[str] = set()
    for p in (p.lower() for p in patterns):
        picked |= {j["name"] for j in all_jobs if (j["name"].lower() == p if p in names else p in j["name"].lower())}
    return [j for j in all_jobs if j["name"] in picked]


def unmatched(all_jobs: list[Job], patterns: list[str]) -> list[str]:
    """The patterns that pick no job (a typo must stop the run before any work)."""
    return [p for p in patterns if not select(all_jobs, [p])]


def headline(job: Job, sample: dict[str, Any]) -> float:
    """The figure a job is judged by: IOPS for 4 KiB jobs, MiB/s for 1 MiB jobs."""
    return float(sample["iops"] if job["bs"] == "4k" else sample["mib_s"])


def unit(job: Job) -> str:
    return "IOPS" if job["bs"] == "4k" else "MiB/s"


# -- fio -----------------------------------------------------------------------------------------------------
def psync_target(raw: Path) -> list[str]:
    """A raw file as a VM with cache=none reads it: O_DIRECT, one blocking request per fio job."""
    return ["--direct=1", "--ioengine=psync", f"--filename={raw}"]


def nbd_uri(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


def nbd_target(sock: Path) -> list[str]:
    return ["--ioengine=nbd", f"--uri={nbd_uri(sock)}"]


def fio_argv(job: Job, target: list[str], runtime: float | None = None) -> list[str]:
    """fio's command for one job against target (psync_target, nbd_target); runtime overrides the job's."""
    args = ["fio", "--output-format=json", *target, "--name=job", f"--rw={job['rw']}", f"--bs={job['bs']}"]
    if "iodepth" in job:
        args += [f"--iodepth={job['iodepth']}"]
    args += [f"--size={job['size']}"]
    if "offset" in job:
        args += [f"--offset={job['offset']}"]
    args += ["--group_reporting", "--randrepeat=0"]
    runtime = runtime or job.get("runtime")
    if runtime:
        args += [f"--runtime={runtime:g}", "--time_based"]
    for key in ("numjobs", "fsync"):
        if key in job:
            args += [f"--{key}={job[key]}"]
    if job.get("end_fsync"):
        args += ["--end_fsync=1"]
    return args


def parse_fio(out: str, job: Job, where: str = "") -> dict[str, float]:
    """fio's JSON (after notes such as "fio: connected to NBD server"): the figures of the job's one side."""
    try:
        data = json.loads(out[out.index("{"):])
    except ValueError:
        raise Unavailable(f"fio printed no JSON: {out.strip()[-200:]}") from None
    result = data["jobs"][0]
    if result.get("error"):
        raise Unavailable(f"fio: error {result['error']}" + (f" on {where}" if where else ""))
    side = result["write"] if "write" in job["rw"] else result["read"]
    pct = side["clat_ns"].get("percentile", {})
    return {"mib_s": side["bw_bytes"] / MiB, "iops": side["iops"], "ios": side["total_ios"],
            "clat_mean_us": side["clat_ns"]["mean"] / 1000, "clat_p99_us": pct.get("99.000000", 0) / 1000}


def fio(raw: Path, job: Job) -> dict[str, float]:
    """One fio job against a raw file (psync, O_DIRECT): MiB/s, IOPS and completion latency (us)."""
    return parse_fio(run(*fio_argv(job, psync_target(raw)), timeout=900).stdout, job, raw.name)
