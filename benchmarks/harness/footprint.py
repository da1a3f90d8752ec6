"""benchmarks/run's footprint figures: daemon memory with a 64 TiB image open, and the time to open it.

A 64 TiB dynamic image has a BAT of 32 MiB: a daemon that loads or scans it eagerly shows here (the target
is a peak RSS under 100 MiB), and so does an `info` that pays for more than Python's start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .fuse_mounts import qsd_start, qsd_stop, vhdxfs, vhdxfs_pid
from .procs import TiB, Unavailable, log, reason, run, vhdxfs_bin


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise Unavailable(f"no VmHWM for pid {pid}")


def touch_big(raw: Path) -> None:
    """Read 64 KiB at every TiB of the disk, so the daemon has really served requests all over it."""
    with open(raw, "rb", buffering=0) as f:
        for off in range(0, 64 * TiB, TiB):
            os.pread(f.fileno(), 65536, off)


def vhdxfs_rss(big: Path, work: Path) -> float:
    mnt = work / "mnt-big"
    with vhdxfs(big, mnt) as raw:
        touch_big(raw)
        return peak_rss_mib(vhdxfs_pid(mnt))


def qsd_rss(big: Path, work: Path) -> float:
    proc, target = qsd_start(big, work, "qsd-big")
    try:
        touch_big(target)
        return peak_rss_mib(proc.pid)
    finally:
        qsd_stop(proc, target)


def timing(cmd: list[Any], work: Path, runs: int) -> dict[str, Any]:
    """Wall time of a short command: hyperfine if installed, else a median of N runs."""
    cmd = [str(c) for c in cmd]
    run(*cmd)  # fails loudly (n/a) if the command does not work at all; also warms the cache
    if shutil.which("hyperfine"):
        export = work / "hyperfine.json"
        run("hyperfine", "-N", "--warmup", "2", "--runs", str(runs), "--export-json", export, " ".join(cmd))
        r = json.loads(export.read_text())["results"][0]
        return {"median": r["median"], "min": r["min"], "runs": runs, "tool": "hyperfine"}
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run(*cmd)
        times.append(time.perf_counter() - t)
    return {"median": statistics.median(times), "min": min(times), "runs": runs, "tool": "loop"}


def footprint(work: Path, quick: bool) -> dict[str, Any]:
    """Peak RSS of vhdxfs and qemu-storage-daemon serving a 64 TiB image, and `info` times; a figure that
    cannot be had is None with its reason under <key>_error."""
    big = work / "big.vhdx"
    out: dict[str, Any] = {}
    try:
        run("qemu-img", "create", "-q", "-f", "vhdx", big, "64T")
    except Unavailable as exc:
        return {"error": str(exc)}
    log("footprint: 64 TiB image")
    rss: tuple[tuple[str, Callable[[Path, Path], float]], ...] = (
        ("vhdxfs_peak_rss_mib", vhdxfs_rss), ("qsd_peak_rss_mib", qsd_rss))
    for key, measure in rss:
        try:
            out[key] = measure(big, work)
        except Exception as exc:
            out[key] = None
            out[key + "_error"] = reason(exc)
    for key, program in (("vhdxfs_info", vhdxfs_bin), ("qemu_img_info", lambda: "qemu-img")):
        try:
            out[key + "_s"] = timing([program(), "info", big], work, 5 if quick else 20)
        except Exception as exc:
            out[key + "_s"] = None
            out[key + "_error"] = reason(exc)
    return out


def fmt(value: float | None, spec: str, unit: str) -> str:
    return "n/a" if value is None else f"{value:{spec}} {unit}"


def footprint_text(extra: dict[str, Any]) -> str:
    """The report's paragraph ('' with --no-footprint)."""
    if not extra:
        return ""
    if "error" in extra:
        return f"\n64 TiB image: n/a ({extra['error']})\n"

    def t(key: str) -> str:
        v = extra.get(key + "_s")
        return "n/a" if v is None else f"{v['median'] * 1000:.0f} ms"
    text = (f"\nWith a 64 TiB image open (64 KiB read at every TiB): peak RSS of the vhdxfs daemon "
            f"{fmt(extra.get('vhdxfs_peak_rss_mib'), '.1f', 'MiB')}, of qemu-storage-daemon "
            f"{fmt(extra.get('qsd_peak_rss_mib'), '.1f', 'MiB')}.\n"
            f"Time to open it (median): `vhdxfs info` {t('vhdxfs_info')}, `qemu-img info` {t('qemu_img_info')}.\n")
    for key in ("vhdxfs_peak_rss_mib_error", "qsd_peak_rss_mib_error", "vhdxfs_info_error", "qemu_img_info_error"):
        if key in extra:
            text += f"- {key.removesuffix('_error')}: n/a ({extra[key]})\n"
    return text
