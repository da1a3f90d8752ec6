"""benchmarks/run-nbd: fio's nbd engine against NBD servers of one VHDX image, side by side.

Contenders (each visit serves its own fresh copy of one dynamic image made by `qemu-img create -f vhdx`,
over a unix socket; the daemon is stopped after the visit):
  vhdxfs         `vhdxfs serve --socket SOCK IMG` (daemonizes; stopped with `vhdxfs stop SOCK`)
  qemu-nbd       `qemu-nbd -f vhdx -t -e 8 --socket=SOCK IMG`: QEMU's C vhdx driver (-t: persistent, it would
                 exit after its first client; -e 8: the default --shared=1 refuses fio's second connection)
  nbdkit-python  (only if named in --contenders) `nbdkit -f --unix SOCK python benchmarks/nbd/nbdkit_vhdx.py
                 image=IMG`: the prototype plugin over vhdxfs's synchronous engine, under Debian's
                 /usr/bin/python3 with PYTHONPATH=<repo>:<venv site-packages>. nbdkit and
                 nbdkit-plugin-python are installed with apt-get if missing (only when this contender is asked for).
qemu-nbd and nbdkit run in the foreground as our children and are stopped by SIGTERM.

Jobs: fio --ioengine=nbd --uri='nbd+unix:///?socket=SOCK' (fio's "connected to NBD server" line is stripped).
The first job writes the first 2 GiB of the fresh image (the span; 256 MiB with --quick), so every job after
it reads or rewrites allocated blocks. Contenders are visited A B B A (A B C C B A with three) per --rounds,
so drift of the machine cancels out. The table gives the median over the visits and the spread (min-max), the
ratios of medians vhdxfs/other, and the CPU time the daemon spent per request (utime+stime of the server
process from /proc, all threads, divided by the requests fio completed). Each job first waits (--quiet-wait)
for the machine to be quiet; the CPUs busy with other work during each job are recorded and summed up below
the table, and a job they disturbed runs again (--retries; the quietest attempt counts). A job that fails
(fio errors out) is "failed" in that visit, with fio's message below the table; the visit goes on with the next
job (not run if the server is gone).
--pin-server CPUS / --pin-fio CPUS pin them with taskset. On a VM a request that wakes a thread on another
(idle, halted) vCPU costs far more than on a host: where the scheduler puts fio and the server moves the
figures a lot, and so does other work on the machine (busy vCPUs do not halt). Pinning makes that fixed.
--vhdxfs-src DIR runs the vhdxfs contender from the code of another checkout (e.g. a snapshot of one commit:
`git archive COMMIT vhdxfs | tar -x -C DIR`), so that commits landing during a long run do not change it.

--profile JOB[,JOB] adds, after the rounds, one more vhdxfs visit that runs each chosen job twice more:
  1. under `py-spy record --threads -f raw` (the whole job but its first and last second): the main thread's
     top self-time frames, as a share of its samples and as microseconds of main-thread time per request;
  2. under `strace -c -f -p PID` (attached before a --strace-seconds fio run starts and detached after it
     ends): syscalls per request (counts divided by the requests fio completed in that run). strace slows the
     daemon a lot, so more requests wait in each recv: the counts per request are a lower bound at QD16.
The raw profiles go to benchmarks/results/ next to the report. `--rounds 0 --profile JOB` profiles only.

--jobs NAME[,NAME] and --profile match job names case-insensitively: a pattern equal to a job name picks that
job, otherwise every job whose name contains it. Results: benchmarks/results/nbd-<timestamp>.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import bench
from bench import (
    CHILDREN,
    REPO,
    VENV,
    GiB,
    Interrupted,
    MiB,
    Unavailable,
    log,
    machine,
    on_signal,
    parse_size,
    reason,
    run,
    spawn,
    stop,
    vhdxfs_bin,
    wait_for,
)

HERE = Path(__file__).resolve().parent
PLUGIN = HERE / "nbd" / "nbdkit_vhdx.py"
CONTENDERS = ("vhdxfs", "qemu-nbd")  # the default set, in visiting order
OPTIONAL = ("nbdkit-python",)  # only when named in --contenders
TICK = os.sysconf("SC_CLK_TCK")
QUIET = 0.25  # CPUs busy with other work below which the machine counts as quiet


# -- jobs ------------------------------------------------------------------------------------------------
def jobs(quick: bool, image_size: int, runtime: float) -> list[dict]:
    """The fio jobs, in the order one visit runs them. size: the span of the disk a job touches."""
    span = min(256 * MiB if quick else 2 * GiB, image_size // 4 // MiB * MiB)
    t = runtime
    return [
        # Into never-written space: allocates the payload blocks and grows the image. Fills the span.
        dict(name="seq write 1M QD16, fresh", rw="write", bs="1M", iodepth=16, size=span, fills=True),
        dict(name="seq write 1M QD16, allocated", rw="write", bs="1M", iodepth=16, size=span),
        dict(name="seq read 1M QD16", rw="read", bs="1M", iodepth=16, size=span, runtime=t),
        dict(name="rand read 4k QD1", rw="randread", bs="4k", iodepth=1, size=span, runtime=t),
        dict(name="rand read 4k QD16", rw="randread", bs="4k", iodepth=16, size=span, runtime=t),
        # Four fio jobs, each its own NBD connection, 16 requests in flight on each.
        dict(name="rand read 4k 4 jobs QD16", rw="randread", bs="4k", iodepth=16, numjobs=4, size=span,
             runtime=t),
        dict(name="rand write 4k QD1", rw="randwrite", bs="4k", iodepth=1, size=span, runtime=t),
        dict(name="rand write 4k QD16", rw="randwrite", bs="4k", iodepth=16, size=span, runtime=t),
    ]


def select(all_jobs: list[dict], patterns: list[str] | None) -> list[dict]:
    """A pattern equal to a job's name (any case) picks that job; otherwise every job whose name contains it."""
    if not patterns:
        return all_jobs
    names = {j["name"].lower() for j in all_jobs}
    picked = set()
    for p in patterns:
        p = p.lower()
        picked |= {j["name"] for j in all_jobs if (j["name"].lower() == p if p in names else p in j["name"].lower())}
    return [j for j in all_jobs if j["name"] in picked]


def uri(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


PIN: dict[str, str | None] = {"server": None, "fio": None}  # --pin-server, --pin-fio: CPU lists for taskset


def fio_args(sock: Path, job: dict, runtime: float | None = None) -> list[str]:
    args = (["taskset", "-c", PIN["fio"]] if PIN["fio"] else []) + [
            "fio", "--output-format=json", "--ioengine=nbd", f"--uri={uri(sock)}", "--name=job",
            f"--rw={job['rw']}", f"--bs={job['bs']}", f"--iodepth={job['iodepth']}", f"--size={job['size']}",
            "--group_reporting", "--randrepeat=0"]
    runtime = runtime or job.get("runtime")
    if runtime:
        args += [f"--runtime={runtime:g}", "--time_based"]
    if "numjobs" in job:
        args += [f"--numjobs={job['numjobs']}"]
    return args


def parse_fio(out: str, job: dict) -> dict:
    """fio's JSON (after its "fio: connected to NBD server" lines): figures of the job's one side."""
    try:
        data = json.loads(out[out.index("{"):])
    except ValueError:
        raise Unavailable(f"fio printed no JSON: {out.strip()[-200:]}") from None
    result = data["jobs"][0]
    if result.get("error"):
        raise Unavailable(f"fio: error {result['error']}")
    side = result["write"] if "write" in job["rw"] else result["read"]
    pct = side["clat_ns"].get("percentile", {})
    return {"mib_s": side["bw_bytes"] / MiB, "iops": side["iops"], "ios": side["total_ios"],
            "clat_mean_us": side["clat_ns"]["mean"] / 1000, "clat_p99_us": pct.get("99.000000", 0) / 1000}


def headline(job: dict, sample: dict) -> float:
    return sample["iops"] if job["bs"] == "4k" else sample["mib_s"]


def cpu_ticks(pid: int, thread: int | None = None) -> int:
    """utime + stime of a process (all its threads), or of one of its threads."""
    path = f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(") ", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all CPUs; /proc/stat, idle and iowait left out)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / TICK


def wait_quiet(limit: float) -> float:
    """Wait (up to limit seconds) until the machine is quiet: under QUIET CPUs busy over half a second.
    Returns the seconds waited. Our own daemons are idle between jobs, so what is busy is someone else."""
    t0 = time.monotonic()
    while True:
        busy0 = machine_busy_s()
        time.sleep(0.5)
        if (machine_busy_s() - busy0) / 0.5 < QUIET or time.monotonic() - t0 >= limit:
            return time.monotonic() - t0


def children_cpu_s() -> float:
    """CPU seconds of our reaped children and their descendants (fio and its job processes, once waited for)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# -- servers: context managers yielding a running server; every one we start is stopped again --------------
@dataclass
class Server:
    name: str
    sock: Path
    pid: int
    cmd: list[str]
    env: dict = field(default_factory=dict)  # the variables added to the environment, for the report
    proc: subprocess.Popen | None = None  # when it is our child
    log: Path | None = None

    def gone(self) -> str | None:
        """Why the server is no longer there (it exited, its socket vanished), or None while it serves."""
        if self.proc is not None and self.proc.poll() is not None:
            said = self.log.read_text().strip().splitlines()[-2:] if self.log and self.log.exists() else []
            return f"{self.name} exited with status {self.proc.returncode}" + (f": {' / '.join(said)}" if said else "")
        if self.proc is None and not Path(f"/proc/{self.pid}").exists():
            return f"{self.name} (pid {self.pid}) is gone"
        if not self.sock.exists():
            return f"the socket {self.sock} is gone"
        return None


SERVING: list[Path] = []  # sockets of vhdxfs daemons (not our children): stopped at the latest on exit
SOURCE: list = [None]  # --vhdxfs-src: the bench.Baseline whose code the vhdxfs contender runs


def serve_pid(sock: Path) -> int:
    """The `vhdxfs serve` daemon listening on sock, found by its command line."""
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if proc.name.isdigit() and b"serve" in argv and str(sock).encode() in argv:
                return int(proc.name)
    raise Unavailable(f"cannot find the vhdxfs daemon serving {sock}")


def check_size(srv: Server, size: int) -> None:
    """A full NBD handshake with nbdinfo (if installed): the server answers and exports the whole disk."""
    if not shutil.which("nbdinfo"):
        return
    got = run("nbdinfo", "--size", uri(srv.sock), timeout=60).stdout.strip()
    if got != str(size):
        raise Unavailable(f"{srv.name} exports {got} bytes, not {size}")


def stop_vhdxfs(sock: Path, pid: int | None, src: bench.Baseline | None = None) -> None:
    try:
        cmd, how = vhdxfs_cmd(src)
        run(*cmd, "stop", sock, timeout=300, **how)
    except Unavailable as exc:
        log(f"vhdxfs stop: {exc}")
        if pid:  # the daemon we started: SIGTERM, then SIGKILL
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                for _ in range(200):
                    os.kill(pid, 0)
                    time.sleep(0.05)
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ValueError):
        SERVING.remove(sock)


def vhdxfs_cmd(src: bench.Baseline | None) -> tuple[list[str], dict]:
    """How to run vhdxfs: this repo's command, or with --vhdxfs-src the code of another checkout."""
    if src is None:
        return [str(vhdxfs_bin())], {}
    src.check()  # every vhdxfs module would come from DIR
    return [str(a) for a in src.cmd], dict(env=src.env, cwd=src.src)


@contextlib.contextmanager
def vhdxfs_server(image: Path, sock: Path, size: int, src: bench.Baseline | None = None) -> Iterator[Server]:
    cmd, how = vhdxfs_cmd(src)
    cmd = [*cmd, "serve", "--socket", str(sock), str(image)]
    run(*cmd, timeout=120, **how)  # returns once the daemon listens
    SERVING.append(sock)
    pid = None
    try:
        pid = serve_pid(sock)
        srv = Server("vhdxfs", sock, pid, cmd, {"PYTHONPATH": str(src.src), "PYTHONSAFEPATH": "1"} if src else {})
        check_size(srv, size)
        yield srv
    finally:
        stop_vhdxfs(sock, pid, src)


@contextlib.contextmanager
def child_server(name: str, cmd: list[str], sock: Path, work: Path, size: int,
                 env: dict | None = None) -> Iterator[Server]:
    """A server that runs in the foreground as our child (qemu-nbd, nbdkit -f); stopped by SIGTERM."""
    logf = work / f"{name}.log"
    try:
        proc = spawn(cmd, logf, env=dict(os.environ, **env) if env else None)
    except FileNotFoundError:
        raise Unavailable(f"{cmd[0]} is not installed") from None
    try:
        wait_for(lambda: proc.poll() is not None or sock.exists(), f"{name} to listen", timeout=60)
        if proc.poll() is not None:
            said = logf.read_text().strip().splitlines()[-3:] or [f"exit status {proc.returncode}"]
            raise Unavailable(f"{name}: {' / '.join(said)}")
        srv = Server(name, sock, proc.pid, cmd, env or {}, proc, logf)
        check_size(srv, size)
        yield srv
    finally:
        stop(proc)
        with contextlib.suppress(ValueError):
            CHILDREN.remove(proc)
        sock.unlink(missing_ok=True)


def venv_site_packages() -> str:
    return run(bench.PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()


def ensure_nbdkit_python() -> None:
    """nbdkit with its python plugin: installed with apt-get if missing (root only)."""
    def ok() -> bool:
        with contextlib.suppress(OSError):
            return subprocess.run(["nbdkit", "--dump-plugin", "python"], capture_output=True).returncode == 0
        return False
    if ok():
        return
    if os.geteuid() != 0:
        raise Unavailable("nbdkit or nbdkit-plugin-python is missing (apt-get install nbdkit nbdkit-plugin-python)")
    log("installing nbdkit nbdkit-plugin-python")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ("apt-get", "install", "-y", "-q", "--no-install-recommends", "nbdkit", "nbdkit-plugin-python")
    try:
        run(*install, env=env, timeout=900)
    except Unavailable:
        run("apt-get", "update", "-q", env=env, timeout=900)
        run(*install, env=env, timeout=900)
    if not ok():
        raise Unavailable("nbdkit's python plugin does not load after installing it")


# -- profiling of the vhdxfs daemon -----------------------------------------------------------------------
def py_spy_bin() -> Path:
    for candidate in (VENV / "py-spy", shutil.which("py-spy")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    log("installing py-spy into the venv")
    run(VENV / "pip", "install", "-q", "py-spy", timeout=600)
    return VENV / "py-spy"


def frame_label(frame: str) -> str:
    return re.sub(r":\d+\)$", ")", frame)  # "func (path:line)" -> "func (path)"


def analyse_profile(text: str, pid: int, rate: int, seconds: float, requests: float, top: int = 20) -> dict:
    """py-spy raw output (idle samples left out): where the main thread spends its time, per request."""
    threads: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    pair: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        threads[frames[0]] += int(n)
        m = re.match(r"thread \((\w+)\)(?::\s*(.*))?", frames[0])
        if not m or not (m.group(1) == str(pid) or (m.group(2) or "").strip() == "MainThread"):
            continue
        n = int(n)
        body = [frame_label(f) for f in frames[1:]]
        total += n
        leaf[body[-1]] += n
        pair[" <- ".join(body[-1:-3:-1])] += n
        for f in set(body):
            incl[f] += n

    def rows(counter):
        return [{"frame": k, "share": v / total, "us_per_req": v / rate / requests * 1e6 if requests else None}
                for k, v in counter.most_common(top)]
    return {"main_samples": total, "main_busy": total / (rate * seconds), "rate_hz": rate, "seconds": seconds,
            "requests": requests,
            "main_us_per_req": total / rate / requests * 1e6 if requests else None,
            "threads": {k: v / (rate * seconds) for k, v in threads.most_common()},
            "self": rows(leaf), "self_with_caller": rows(pair), "inclusive": rows(incl)}


def parse_strace(text: str, requests: int) -> dict:
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
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return line.split()[1] != "0"
    return False


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=30)


def profile_job(srv: Server, job: dict, args, out_dir: Path, stamp: str) -> dict:
    """One job under py-spy, then under strace -c; both as separate fio runs against the same daemon."""
    slug = re.sub(r"[^a-z0-9]+", "-", job["name"].lower()).strip("-")
    seconds, rate = args.profile_seconds, 100
    spy = py_spy_bin()
    raw = out_dir / f"nbd-{stamp}-pyspy-{slug}.txt"
    result: dict = {"job": job["name"]}

    # 1. py-spy over the middle of a fio run (it samples at 100 Hz, pausing the daemon for each sample).
    os.sync()
    fio = subprocess.Popen(fio_args(srv.sock, job, runtime=seconds + 2), stdout=subprocess.PIPE,
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
    result["py_spy"] = {"iops": s["iops"], "mib_s": s["mib_s"], "raw_file": str(raw),
                        "samples_all_threads": int(m.group(1)) if m else None,
                        "errors": int(m.group(2)) if m else None,
                        **analyse_profile(raw.read_text(), srv.pid, rate, seconds, s["iops"] * seconds)}
    log(f"  py-spy {job['name']}: {s['iops']:.0f} IOPS meanwhile, main thread busy "
        f"{result['py_spy']['main_busy']:.0%}")

    # 2. strace -c -f around a whole fio run: every request of the run is in the counts.
    os.sync()
    st_file = out_dir / f"nbd-{stamp}-strace-{slug}.txt"
    strace = subprocess.Popen(["strace", "-c", "-f", "-p", str(srv.pid), "-o", str(st_file)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: strace.poll() is not None or traced(srv.pid), "strace to attach")
        if strace.poll() is not None:
            raise Unavailable(f"strace: {strace.communicate()[1].strip()[-200:]}")
        time.sleep(0.5)  # -f: the other threads are attached after the first one
        fio_cpu0, t0 = cpu_ticks(srv.pid), time.monotonic()
        s2 = parse_fio(run(*fio_args(srv.sock, job, runtime=args.strace_seconds), timeout=900).stdout, job)
        window = time.monotonic() - t0
        strace.send_signal(signal.SIGINT)
        strace.communicate(timeout=60)
    except BaseException:
        kill_group(strace, signal.SIGINT)
        raise
    result["strace"] = {"iops": s2["iops"], "window_s": window, "raw_file": str(st_file),
                        "daemon_cpu_s": (cpu_ticks(srv.pid) - fio_cpu0) / TICK,
                        **parse_strace(st_file.read_text(), s2["ios"])}
    log(f"  strace {job['name']}: {s2['iops']:.0f} IOPS meanwhile, "
        f"{result['strace']['total_per_request']:.2f} syscalls per request")
    return result


def profile_text(p: dict, unprofiled: float | None) -> str:
    spy, st = p["py_spy"], p["strace"]
    lines = [f"### Breakdown: {p['job']} (vhdxfs)", ""]
    if unprofiled:
        lines.append(f"Without a profiler (median of the rounds): {unprofiled:.0f} IOPS.")
    lines += [f"py-spy {spy['seconds']:g} s at {spy['rate_hz']} Hz: {spy['iops']:.0f} IOPS meanwhile, "
              f"~{spy['requests']:.0f} requests; main thread on CPU {spy['main_busy']:.0%} of the time, "
              f"{spy['main_us_per_req']:.1f} us of main-thread time per request.",
              "Threads (share of the window on CPU): "
              + ", ".join(f"{k.removeprefix('thread ')} {v:.0%}" for k, v in spy["threads"].items() if v >= 0.01),
              "", "Main thread, self time by function (share of its samples, us per request):", "```"]
    lines += [f"{r['share'] * 100:5.1f}% {r['us_per_req']:6.2f} us  {r['frame']}" for r in spy["self"]]
    lines += ["```", "", "Main thread, self time by function <- caller:", "```"]
    lines += [f"{r['share'] * 100:5.1f}% {r['us_per_req']:6.2f} us  {r['frame']}" for r in spy["self_with_caller"]]
    lines += ["```", "", "Main thread, inclusive (frames on the stack):", "```"]
    lines += [f"{r['share'] * 100:5.1f}% {r['us_per_req']:6.2f} us  {r['frame']}" for r in spy["inclusive"]]
    lines += ["```", "",
              f"strace -c -f over a {st['window_s']:.1f} s fio run: {st['iops']:.0f} IOPS meanwhile, "
              f"{st['requests']} requests, daemon CPU {st['daemon_cpu_s']:.2f} s; "
              f"{st['total_per_request']:.2f} syscalls per request:", "```"]
    lines += [f"{v:7.3f}  {k}" + (f"  ({st['syscalls'][k]['errors']} errors)" if st["syscalls"][k]["errors"] else "")
              for k, v in st["per_request"].items() if v >= 0.001]
    lines += ["```", ""]
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------------------------
class NbdBench(bench.Visits):
    def __init__(self, args, work: Path) -> None:
        self.args = args
        self.work = work
        self.base = work / "base.vhdx"
        self.size = 0
        self.results: dict[str, dict[str, list[dict]]] = {}  # contender -> job -> one sample per visit
        self.errors: dict[str, str] = {}
        self.job_errors: dict[str, dict[str, list[str]]] = {}  # contender -> job -> what failed, per visit
        self.commands: dict[str, dict] = {}
        self.profiles: list[dict] = []
        self.visit_no = 0
        self.site_packages: str | None = None

    def prepare(self) -> None:
        run("qemu-img", "create", "-q", "-f", "vhdx", self.base, self.args.size)
        self.size = json.loads(run("qemu-img", "info", "--output=json", self.base).stdout)["virtual-size"]
        self.all_jobs = jobs(self.args.quick, self.size, self.args.runtime)
        self.jobs = select(self.all_jobs, self.args.jobs)
        self.span = self.all_jobs[0]["size"]
        if "nbdkit-python" in self.args.contenders:
            try:
                ensure_nbdkit_python()
                self.site_packages = venv_site_packages()
            except Unavailable as exc:
                self.errors["nbdkit-python"] = str(exc)

    @contextlib.contextmanager
    def server(self, name: str) -> Iterator[Server]:
        image = self.work / f"{name}.vhdx"
        sock = self.work / f"{name}.sock"
        shutil.copyfile(self.base, image)
        try:
            if name == "vhdxfs":
                cm = vhdxfs_server(image, sock, self.size, SOURCE[0])
            elif name == "qemu-nbd":
                cmd = ["qemu-nbd", "-f", "vhdx", "-t", "-e", "8", f"--socket={sock}", str(image)]
                cm = child_server(name, cmd, sock, self.work, self.size)
            else:
                cmd = ["nbdkit", "-f", "--unix", str(sock), "python", str(PLUGIN), f"image={image}"]
                env = {"PYTHONPATH": f"{REPO}:{self.site_packages}"}
                cm = child_server(name, cmd, sock, self.work, self.size, env)
            with cm as srv:
                if PIN["server"]:  # every thread it has; the threads it starts later inherit the mask
                    run("taskset", "-a", "-p", "-c", PIN["server"], srv.pid)
                self.commands.setdefault(name, {"server": srv.cmd, "env": srv.env, "pinned_to": PIN["server"]})
                yield srv
        finally:
            image.unlink(missing_ok=True)  # gigabytes once written
            os.sync()  # the host's writeback of this visit must not land on the next contender's time

    def fill(self, srv: Server) -> None:
        """With --jobs, the span must still be written before the selected jobs: the fill runs unmeasured."""
        job = self.all_jobs[0]
        if job not in self.jobs:
            run(*fio_args(srv.sock, job), timeout=900)
            log(f"  {srv.name:13} ({job['name']}: unmeasured, fills the span)")

    def visit(self, name: str) -> None:
        with self.server(name) as srv:
            self.fill(srv)
            for job in self.jobs:
                try:
                    if why := srv.gone():
                        raise Unavailable(f"not run: {why}")
                    self.sample(srv, job)
                except Unavailable as exc:  # this job is n/a in this visit; the server may serve the next
                    why = srv.gone()
                    msg = f"visit {self.visit_no}: {exc}" + (f" ({why})" if why and "not run" not in str(exc) else "")
                    self.job_errors.setdefault(name, {}).setdefault(job["name"], []).append(msg)
                    log(f"  {name:13} {job['name']:28} failed: {msg}")

    def sample(self, srv: Server, job: dict) -> None:
        """One measured run of job; again (up to --retries times) while others kept the machine busy during it,
        keeping the quietest attempt. Not the job into fresh space: a second run would find it written."""
        argv = fio_args(srv.sock, job)
        self.commands.setdefault("fio", {})[job["name"]] = fio_args(Path("SOCK"), job)
        tries = 1 if job.get("fills") else 1 + self.args.retries
        attempts: list[dict] = []
        for attempt in range(tries):
            # The daemons write through the host's page cache: a job must not share the machine with the
            # writeback of the one before it.
            os.sync()
            waited = wait_quiet(self.args.quiet_wait) if self.args.quiet_wait else 0.0
            cpu0, main0 = cpu_ticks(srv.pid), cpu_ticks(srv.pid, srv.pid)
            busy0, fio0, t0 = machine_busy_s(), children_cpu_s(), time.monotonic()
            s = parse_fio(run(*argv, timeout=900).stdout, job)
            busy, fio_cpu, wall = machine_busy_s() - busy0, children_cpu_s() - fio0, time.monotonic() - t0
            cpu, main = cpu_ticks(srv.pid) - cpu0, cpu_ticks(srv.pid, srv.pid) - main0
            s |= {"cpu_us_per_io": cpu / TICK / s["ios"] * 1e6 if s["ios"] else None,
                  "main_cpu_us_per_io": main / TICK / s["ios"] * 1e6 if s["ios"] else None,
                  "fio_cpus": fio_cpu / wall, "daemon_cpus": cpu / TICK / wall,
                  # CPUs busy with anything but fio and the server (other processes, the kernel's writeback)
                  "other_cpus": max(0.0, busy - fio_cpu - cpu / TICK) / wall,
                  "waited_s": waited, "visit": self.visit_no}
            attempts.append(s)
            unit = "IOPS" if job["bs"] == "4k" else "MiB/s"
            log(f"  {srv.name:13} {job['name']:28} {headline(job, s):9.0f} {unit}   "
                f"{s['cpu_us_per_io']:7.1f} us CPU/req; CPUs busy: server {s['daemon_cpus']:.2f}, fio "
                f"{s['fio_cpus']:.2f}, others {s['other_cpus']:.2f}"
                + (f" (waited {waited:.0f} s)" if waited > 1 else "")
                + (" -> again" if s["other_cpus"] > QUIET and attempt + 1 < tries else ""))
            if s["other_cpus"] <= QUIET:
                break
        best = min(attempts, key=lambda a: a["other_cpus"])
        if len(attempts) > 1:
            best = best | {"attempts": [{"value": headline(job, a), "other_cpus": a["other_cpus"]} for a in attempts]}
        self.results.setdefault(srv.name, {}).setdefault(job["name"], []).append(best)

    def profile(self, out_dir: Path, stamp: str) -> None:
        chosen = select(self.all_jobs, self.args.profile)
        log(f"profiling vhdxfs: {', '.join(j['name'] for j in chosen)}")
        self.visit_no = 0
        with self.server("vhdxfs") as srv:
            fill = self.all_jobs[0]
            run(*fio_args(srv.sock, fill), timeout=900)  # the profiled jobs find the span written
            for job in chosen:
                try:
                    self.profiles.append(profile_job(srv, job, self.args, out_dir, stamp))
                except Unavailable as exc:
                    self.profiles.append({"job": job["name"], "error": str(exc)})
                    log(f"  profile {job['name']}: n/a ({exc})")


# -- report ----------------------------------------------------------------------------------------------
def medians(nb: NbdBench) -> dict[str, dict[str, float]]:
    return {c: {j: statistics.median(headline(job, s) for s in nb.results[c][j]) for job in nb.jobs
                if (j := job["name"]) in nb.results.get(c, {})} for c in nb.args.contenders}


def figure(job: dict, v: float) -> str:
    return f"{v / 1000:.1f}k" if job["bs"] == "4k" else f"{v:.0f}"


def table(nb: NbdBench) -> str:
    names = nb.args.contenders
    refs = [c for c in names if c != "vhdxfs"] if "vhdxfs" in names else []
    med = medians(nb)
    lines = ["| job | unit | " + " | ".join(f"{c} median (min–max)" for c in names)
             + "".join(f" | vhdxfs/{r}" for r in refs) + " |",
             "|---|---|" + "---:|" * (len(names) + len(refs))]
    for job in nb.jobs:
        j, cells = job["name"], []
        for c in names:
            values = [headline(job, s) for s in nb.results.get(c, {}).get(j, [])]
            failed = len(nb.job_errors.get(c, {}).get(j, []))
            if not values:
                cells.append("failed" if failed else "n/a")
            elif len(values) == 1:
                cells.append(figure(job, values[0]))
            else:
                cells.append(f"{figure(job, med[c][j])} ({figure(job, min(values))}–{figure(job, max(values))})")
            if values and failed:
                cells[-1] += f", {failed} failed"
        v = med.get("vhdxfs", {}).get(j)
        for r in refs:
            d = med.get(r, {}).get(j)
            cells.append(f"{v / d:.2f}x" if v and d else "n/a")
        lines.append(f"| {j} | {'IOPS' if job['bs'] == '4k' else 'MiB/s'} | " + " | ".join(cells) + " |")
    lines += ["", "Daemon CPU time per request, median (us; utime+stime of all its threads / requests; "
              "in brackets: its main thread, where it serves requests):", "",
              "| job | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for job in nb.jobs:
        cells = []
        for c in names:
            ss = nb.results.get(c, {}).get(job["name"], [])
            if not ss or ss[0]["cpu_us_per_io"] is None:
                cells.append("n/a")
                continue
            cpu = statistics.median(s["cpu_us_per_io"] for s in ss)
            main = statistics.median(s["main_cpu_us_per_io"] for s in ss)
            cells.append(f"{cpu:.1f} ({main:.1f})" if main >= 0.05 else f"{cpu:.1f}")  # nbdkit: workers serve
        lines.append(f"| {job['name']} | " + " | ".join(cells) + " |")
    noisy = []
    for job in nb.jobs:
        for c in names:
            values = [headline(job, s) for s in nb.results.get(c, {}).get(job["name"], [])]
            if len(values) > 1 and min(values) > 0 and max(values) / min(values) > 1.25:
                noisy.append(f"{job['name']} / {c}")
    if noisy:
        lines += ["", "Visits differing by more than 25%: " + "; ".join(noisy) + "."]
    others = {c: [s["other_cpus"] for ss in per.values() for s in ss if "other_cpus" in s]
              for c, per in nb.results.items()}
    if any(others.values()):
        lines += ["", f"CPUs busy with other work (not fio, not the server) during the jobs, of {os.cpu_count()}: "
                  + "; ".join(f"{c} median {statistics.median(v):.2f}, max {max(v):.2f}, above "
                              f"{QUIET:.2f} in {sum(x > QUIET for x in v)} of {len(v)} jobs"
                              for c, v in others.items() if v) + "."]
    return "\n".join(lines)


def tool_versions(src: Path | None) -> dict:
    out = bench.versions()
    out.pop("vhdimount", None)
    if src:
        out["vhdxfs_src"] = {"dir": str(src), **bench.git_state(src)}
    for name, cmd in (("qemu-nbd", ["qemu-nbd", "--version"]), ("nbdkit", ["nbdkit", "--version"]),
                      ("py-spy", [str(VENV / "py-spy"), "--version"]), ("strace", ["strace", "-V"])):
        with contextlib.suppress(OSError):
            text = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
            out[name] = text.splitlines()[0] if text else ""
    return out


def report(nb: NbdBench, elapsed: float, argv: list[str]) -> str:
    args, m = nb.args, machine(nb.args.workdir)
    text = f"## NBD: `{shlex.join(['benchmarks/run-nbd', *argv])}`\n\n"
    state = bench.git_state(args.vhdxfs_src or REPO)
    text += (f"vhdxfs code: {args.vhdxfs_src or REPO} at {state.get('commit') or '(no git commit)'}"
             f"{' with vhdxfs/ modified' if state.get('vhdxfs_modified') else ''}.\n\n")
    if nb.results:
        text += table(nb) + "\n"
        text += (f"\nMedians of {args.rounds * 2} visits per contender (order per round: "
                 f"{' '.join(args.contenders + args.contenders[::-1])}), each on a fresh copy of an {args.size} "
                 f"image; {nb.span // MiB} MiB span written by the first job; random jobs and seq read "
                 f"{args.runtime:g} s each; fio --ioengine=nbd over a unix socket.\n")
    text += (f"Run took {elapsed / 60:.1f} min. Machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_gib']} GiB RAM, "
             f"Linux {m['kernel']}, images on {m['workdir_fs'] or '?'}.\n\nServers:\n")
    for name, c in nb.commands.items():
        if name != "fio":
            env = " ".join(f"{k}={v}" for k, v in c["env"].items())
            text += f"- {name}: `{(env + ' ') if env else ''}{shlex.join(c['server'])}`" + (
                f", then `taskset -a -p -c {c['pinned_to']} PID`" if c.get("pinned_to") else "") + "\n"
    if nb.commands.get("fio"):
        text += "\nfio, per job (SOCK: the contender's socket):\n"
        for j, fio_argv in nb.commands["fio"].items():
            text += f"- {j}: `{shlex.join(fio_argv)}`\n"
    unprofiled = medians(nb).get("vhdxfs", {})
    for p in nb.profiles:
        text += "\n" + (f"### Breakdown: {p['job']}: n/a ({p['error']})\n" if "error" in p
                        else profile_text(p, unprofiled.get(p["job"])))
    for name, err in nb.errors.items():
        text += f"\n{name}: n/a ({err})"
    for name, per_job in nb.job_errors.items():
        for j, errs in per_job.items():
            text += f"\n{name}, {j}: failed in {len(errs)} visit(s): {errs[0]}"
    return text.rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/run-nbd", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="8G", help="virtual size of the test image (default 8G)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 256 MiB span and 4 s timed jobs")
    ap.add_argument("--rounds", type=int, default=1,
                    help="A B B A passes (default 1: each contender visited twice); 0 with --profile: profile only")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help=f"comma-separated, from {','.join(CONTENDERS + OPTIONAL)} (default {','.join(CONTENDERS)})")
    ap.add_argument("--jobs", metavar="NAME,NAME", help="run only these jobs (see above), e.g. 'rand read 4k'")
    ap.add_argument("--runtime", type=float, help="seconds of each timed job (default 12, 4 with --quick)")
    ap.add_argument("--profile", metavar="JOB,JOB",
                    help="then profile the vhdxfs daemon during these jobs (py-spy and strace -c), e.g. "
                         "'rand read 4k QD16,rand write 4k QD16'")
    ap.add_argument("--profile-seconds", type=float, default=8, help="py-spy's window per job (default 8)")
    ap.add_argument("--strace-seconds", type=float, default=5, help="the fio run under strace (default 5)")
    ap.add_argument("--vhdxfs-src", metavar="DIR",
                    help="run the vhdxfs contender from the code of checkout DIR (this venv's interpreter, "
                         "PYTHONPATH=DIR; see Baseline in bench.py), e.g. a worktree with a fix")
    ap.add_argument("--quiet-wait", type=float, default=60, metavar="SECONDS",
                    help=f"before each job, wait up to this long for the machine to be quiet (under {QUIET} CPUs "
                         "busy with other work); 0: do not wait (default 60)")
    ap.add_argument("--retries", type=int, default=2,
                    help=f"run a job again (up to this many times) when other work kept more than {QUIET} CPUs busy "
                         "during it, keeping the quietest attempt (default 2; never the job into fresh space)")
    ap.add_argument("--pin-server", metavar="CPUS",
                    help="pin the server (all its threads) to these CPUs (taskset list, e.g. 1)")
    ap.add_argument("--pin-fio", metavar="CPUS", help="run fio pinned to these CPUs (e.g. 0)")
    ap.add_argument("--workdir", default="/var/tmp", help="where the images go (default /var/tmp)")
    ap.add_argument("--results", default=str(HERE / "results"), help="where the JSON and Markdown go")
    argv = sys.argv[1:]
    args = ap.parse_args()
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if bad := set(args.contenders) - set(CONTENDERS + OPTIONAL):
        ap.error(f"unknown contender(s): {', '.join(sorted(bad))}")
    if len(set(args.contenders)) != len(args.contenders):
        ap.error("a contender is named twice")
    if args.runtime is None:
        args.runtime = 4 if args.quick else 12
    names = [j["name"] for j in jobs(False, 8 * GiB, 1)]
    for opt in ("jobs", "profile"):
        if getattr(args, opt):
            patterns = [p.strip() for p in getattr(args, opt).split(",") if p.strip()]
            setattr(args, opt, patterns)
            if unmatched := [p for p in patterns if not select([{"name": n} for n in names], [p])]:
                ap.error(f"--{opt}: no job matches {', '.join(map(repr, unmatched))}; the jobs: {'; '.join(names)}")
    if args.rounds < 0 or (args.rounds == 0 and not args.profile):
        ap.error("--rounds 0 needs --profile")
    parse_size(args.size)
    if args.vhdxfs_src:
        args.vhdxfs_src = Path(args.vhdxfs_src).resolve()
        if not (args.vhdxfs_src / "vhdxfs" / "cli.py").is_file():
            ap.error(f"--vhdxfs-src {args.vhdxfs_src}: no vhdxfs/cli.py there")
        SOURCE[0] = bench.Baseline(args.vhdxfs_src)
    PIN.update(server=args.pin_server, fio=args.pin_fio)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, on_signal)
    work = Path(tempfile.mkdtemp(prefix="vhdxfs-nbd-bench-", dir=args.workdir))
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    nb = NbdBench(args, work)
    try:
        nb.prepare()
        log(f"image {args.size}, span {nb.span // MiB} MiB, work dir {work}, {len(nb.jobs)} of "
            f"{len(nb.all_jobs)} jobs, contenders {', '.join(args.contenders)}")
        nb.contend()
        if args.profile:
            try:
                nb.profile(out, stamp)
            except Exception as exc:
                nb.errors["profile"] = reason(exc)
                log(f"  profile: n/a ({nb.errors['profile']})")
    except (KeyboardInterrupt, Interrupted) as exc:
        log(f"interrupted ({exc}); cleaning up, no report")
        return 130
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        for sock in list(SERVING):
            stop_vhdxfs(sock, None, SOURCE[0])
        for proc in CHILDREN:
            stop(proc, timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - bench.T0
    text = report(nb, elapsed, argv)
    print(text)
    record = {"when": stamp, "argv": argv,
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "image_bytes": nb.size, "machine": machine(args.workdir), "versions": tool_versions(args.vhdxfs_src),
              "commands": nb.commands, "jobs": nb.jobs, "results": nb.results, "errors": nb.errors,
              "job_errors": nb.job_errors,
              "profiles": nb.profiles, "elapsed_s": elapsed}
    bench.save_results(out, f"nbd-{stamp}", record, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
