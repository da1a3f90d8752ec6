"""benchmarks/run-nbd --profile: where the vhdxfs daemon's time goes per request, by py-spy and strace.

A median says how fast, not why. After the rounds, one more vhdxfs visit runs each chosen job twice more:
  1. under `py-spy record --threads -f raw` (the whole job but its first and last second): the main thread's
     top self-time frames, as a share of its samples and as microseconds of main-thread time per request;
  2. under `strace -c -f -p PID` (attached before a --strace-seconds fio run starts and detached after it
     ends): syscalls per request (counts divided by the requests fio completed in that run). strace slows the
     daemon a lot, so more requests wait in each recv: the counts per request are a lower bound at QD16.
Kept apart from the measured rounds: both tools slow the daemon, so no figure of a round comes from here.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cpu import TICK, cpu_ticks
from .jobs import Job, parse_fio
from .nbd_servers import Server
from .procs import VENV, Unavailable, log, run, wait_for

FioArgv = Callable[[Path, Job, float | None], list[str]]  # socket, job, runtime -> fio's command


def py_spy_bin() -> Path:
    for candidate in (VENV / "py-spy", shutil.which("py-spy")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    log("installing py-spy into the venv")
    run(VENV / "pip", "install", "-q", "py-spy", timeout=600)
    return VENV / "py-spy"


def frame_label(frame: str) -> str:
    return re.sub(r":\d+\)$", ")", frame)  # "func (path:line)" -> "func (path)"


def analyse_profile(text: str, pid: int, rate: int, seconds: float, requests: float, top: int = 20) -> dict[str, Any]:
    """py-spy raw output (idle samples left out): where the main thread spends its time, per request."""
    threads: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    pair: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames, n = stack.split(";"), int(count)
        threads[frames[0]] += n
        m = re.match(r"thread \((\w+)\)(?::\s*(.*))?", frames[0])
        if not m or not (m.group(1) == str(pid) or (m.group(2) or "").strip() == "MainThread"):
            continue
        body = [frame_label(f) for f in frames[1:]]
        total += n
        leaf[body[-1]] += n
        pair[" <- ".join(body[-1:-3:-1])] += n
        for f in set(body):
            incl[f] += n

    def rows(counter: collections.Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": k, "share": v / total, "us_per_req": v / rate / requests * 1e6 if requests else None}
                for k, v in counter.most_common(top)]
    return {"main_samples": total, "main_busy": total / (rate * seconds), "rate_hz": rate, "seconds": seconds,
            "requests": requests,
            "main_us_per_req": total / rate / requests * 1e6 if requests else None,
            "threads": {k: v / (rate * seconds) for k, v in threads.most_common()},
            "self": rows(leaf), "self_with_caller": rows(pair), "inclusive": rows(incl)}


def parse_strace(text: str, requests: int) -> dict[str, Any]:
    """strace -c's table: calls (and errors) per syscall, and per request."""
    calls = {}
    for line in text.splitlines():
        tok = line.split()
        if len(tok) in (5, 6) and re.fullmatch(r"[\d.]+", tok[0]) and tok[-1] != "total":
            calls[tok[-1]] = {"calls": int(tok[3]), "errors": int(tok[4]) if len(tok) == 6 else 0,
                              "seconds": float(tok[1])}
    per = {k: v["calls"] / requests for k, v in calls.items()} if requests else {}
    return {"requests": requests, "syscalls": calls, "per_request": dict(sorted(per.items(), key=lambda x: -x[1])),
            "total_per_request": sum(per.values()) if per else None}


def traced(pid: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return line.split()[1] != "0"
    except OSError:
        pass
    return False


def kill_group(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def under_py_spy(srv: Server, job: Job, fio_argv: FioArgv, seconds: float, raw: Path) -> dict[str, Any]:
    """py-spy over the middle of a fio run (it samples at 100 Hz, pausing the daemon for each sample)."""
    rate = 100
    spy = py_spy_bin()
    os.sync()
    fio = subprocess.Popen(fio_argv(srv.sock, job, seconds + 2), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        time.sleep(1)
        said = run(spy, "record", "--threads", "-f", "raw", "-r", rate, "-d", f"{seconds:g}", "-p", srv.pid,
                   "-o", raw, timeout=seconds + 120)
        out, err = fio.communicate(timeout=seconds + 120)
    except BaseException:
        kill_group(fio)
        raise
    if fio.returncode:
        raise Unavailable(f"fio under py-spy failed: {err.strip()[-200:]}")
    s = parse_fio(out, job)
    m = re.search(r"Samples: (\d+) Errors: (\d+)", said.stdout + said.stderr)
    return {"iops": s["iops"], "mib_s": s["mib_s"], "raw_file": str(raw),
            "samples_all_threads": int(m.group(1)) if m else None, "errors": int(m.group(2)) if m else None,
            **analyse_profile(raw.read_text(), srv.pid, rate, seconds, s["iops"] * seconds)}


def under_strace(srv: Server, job: Job, fio_argv: FioArgv, seconds: float, st_file: Path) -> dict[str, Any]:
    """strace -c -f around a whole fio run: every request of the run is in the counts."""
    os.sync()
    strace = subprocess.Popen(["strace", "-c", "-f", "-p", str(srv.pid), "-o", str(st_file)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: strace.poll() is not None or traced(srv.pid), "strace to attach")
        if strace.poll() is not None:
            raise Unavailable(f"strace: {strace.communicate()[1].strip()[-200:]}")
        time.sleep(0.5)  # -f: the other threads are attached after the first one
        cpu0, t0 = cpu_ticks(srv.pid), time.monotonic()
        s = parse_fio(run(*fio_argv(srv.sock, job, seconds), timeout=900).stdout, job)
        window = time.monotonic() - t0
        strace.send_signal(signal.SIGINT)
        strace.communicate(timeout=60)
    except BaseException:
        kill_group(strace, signal.SIGINT)
        raise
    return {"iops": s["iops"], "window_s": window, "raw_file": str(st_file),
            "daemon_cpu_s": (cpu_ticks(srv.pid) - cpu0) / TICK, **parse_strace(st_file.read_text(), int(s["ios"]))}


def profile_job(srv: Server, job: Job, fio_argv: FioArgv, spy_seconds: float, strace_seconds: float,
                out_dir: Path, stamp: str) -> dict[str, Any]:
    """One job under py-spy, then under strace -c; both as separate fio runs against the same daemon. The
    raw profiles go to out_dir (benchmarks/results/) next to the report."""
    slug = re.sub(r"[^a-z0-9]+", "-", job["name"].lower()).strip("-")
    spy = under_py_spy(srv, job, fio_argv, spy_seconds, out_dir / f"nbd-{stamp}-pyspy-{slug}.txt")
    log(f"  py-spy {job['name']}: {spy['iops']:.0f} IOPS meanwhile, main thread busy {spy['main_busy']:.0%}")
    st = under_strace(srv, job, fio_argv, strace_seconds, out_dir / f"nbd-{stamp}-strace-{slug}.txt")
    log(f"  strace {job['name']}: {st['iops']:.0f} IOPS meanwhile, {st['total_per_request']:.2f} syscalls per request")
    return {"job": job["name"], "py_spy": spy, "strace": st}


def profile_text(p: dict[str, Any], unprofiled: float | None) -> str:
    """The report's breakdown of one profiled job; unprofiled: the job's median IOPS in the rounds."""
    if "error" in p:
        return f"### Breakdown: {p['job']}: n/a ({p['error']})\n"
    spy, st = p["py_spy"], p["strace"]
    lines = [f"### Breakdown: {p['job']} (vhdxfs)", ""]
    if unprofiled:
        lines.append(f"Without a profiler (median of the rounds): {unprofiled:.0f} IOPS.")
    lines += [f"py-spy {spy['seconds']:g} s at {spy['rate_hz']} Hz: {spy['iops']:.0f} IOPS meanwhile, "
              f"~{spy['requests']:.0f} requests; main thread on CPU {spy['main_busy']:.0%} of the time, "
              f"{spy['main_us_per_req']:.1f} us of main-thread time per request.",
              "Threads (share of the window on CPU): "
              + ", ".join(f"{k.removeprefix('thread ')} {v:.0%}" for k, v in spy["threads"].items() if v >= 0.01)]
    for title, key in (("Main thread, self time by function (share of its samples, us per request):", "self"),
                       ("Main thread, self time by function <- caller:", "self_with_caller"),
                       ("Main thread, inclusive (frames on the stack):", "inclusive")):
        lines += ["", title, "```"]
        lines += [f"{r['share'] * 100:5.1f}% {r['us_per_req']:6.2f} us  {r['frame']}" for r in spy[key]]
        lines += ["```"]
    lines += ["",
              f"strace -c -f over a {st['window_s']:.1f} s fio run: {st['iops']:.0f} IOPS meanwhile, "
              f"{st['requests']} requests, daemon CPU {st['daemon_cpu_s']:.2f} s; "
              f"{st['total_per_request']:.2f} syscalls per request:", "```"]
    lines += [f"{v:7.3f}  {k}" + (f"  ({st['syscalls'][k]['errors']} errors)" if st["syscalls"][k]["errors"] else "")
              for k, v in st["per_request"].items() if v >= 0.001]
    lines += ["```", ""]
    return "\n".join(lines)
