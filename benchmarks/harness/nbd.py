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
  vhdxfs-base    (only with --baseline DIR) `vhdxfs serve` run from the code of the checkout DIR (this repo's
                 venv interpreter, PYTHONPATH=DIR): an A/B of two versions in one session. Visited right after
                 vhdxfs; the table adds the ratio of medians vhdxfs/vhdxfs-base.
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
--pin-server CPUS / --pin-fio CPUS pin them with taskset (default: no pinning). On a VM a request that wakes a
thread on another (idle, halted) vCPU costs far more than on a host: where the scheduler puts fio and the
server moves the figures a lot, and so does other work on the machine (busy vCPUs do not halt).
--vhdxfs-src DIR runs the vhdxfs contender from the code of another checkout (e.g. a snapshot of one commit:
`git archive COMMIT vhdxfs | tar -x -C DIR`), so that commits landing during a long run do not change it.

--profile JOB[,JOB] adds, after the rounds, one more vhdxfs visit that runs each chosen job twice more, under
py-spy and under strace -c (harness/profiler.py tells how). The raw profiles go to benchmarks/results/ next to the
report. `--rounds 0 --profile JOB` profiles only.

--jobs NAME[,NAME] and --profile match job names case-insensitively: a pattern equal to a job name picks that
job, otherwise every job whose name contains it. Results: benchmarks/results/nbd-<timestamp>.{json,md}.
The FUSE front end is benchmarks/run (harness/fuse.py); both share harness/jobs.py, visits.py and results.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import options
from .baseline import BASELINE, Baseline, checkout
from .cpu import QUIET, TICK, children_cpu_s, cpu_ticks, machine_busy_s, wait_quiet
from .jobs import Job, fio_argv, headline, nbd_target, parse_fio, select, unit
from .nbd_report import TOOLS, report
from .nbd_servers import (
    Server,
    child_server,
    ensure_nbdkit_python,
    nbdkit_cmd,
    qemu_nbd_cmd,
    stop_all_vhdxfs,
    venv_site_packages,
    vhdxfs_server,
)
from .procs import REPO, T0, MiB, Unavailable, log, reason, run
from .profiler import profile_job
from .results import git_state, record, save_results
from .visits import Visits, session

CONTENDERS = ("vhdxfs", "qemu-nbd")  # the default set, in visiting order
OPTIONAL = ("nbdkit-python",)  # only when named in --contenders


class NbdBench(Visits):
    """One visit: a fresh server of the contender, the span filled, every selected job measured with the
    daemon's CPU time per request and the machine's other load; a failing job is failed in that visit only."""

    front = "nbd"

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        super().__init__(args, work)
        self.source = Baseline(args.vhdxfs_src) if args.vhdxfs_src else None  # the vhdxfs contender's code
        self.job_errors: dict[str, dict[str, list[str]]] = {}  # contender -> job -> what failed, per visit
        self.commands: dict[str, Any] = {}  # how each server and each fio job was run, for the report
        self.profiles: list[dict[str, Any]] = []
        self.site_packages: str | None = None

    def prepare(self) -> None:
        super().prepare()
        if "nbdkit-python" in self.args.contenders:
            try:
                ensure_nbdkit_python()
                self.site_packages = venv_site_packages()
            except Unavailable as exc:
                self.errors["nbdkit-python"] = str(exc)

    def fio_argv(self, sock: Path, job: Job, runtime: float | None = None) -> list[str]:
        pin = ["taskset", "-c", self.args.pin_fio] if self.args.pin_fio else []
        return pin + fio_argv(job, nbd_target(sock), runtime)

    @contextlib.contextmanager
    def server(self, name: str) -> Iterator[Server]:
        image, sock = self.work / f"{name}.vhdx", self.work / f"{name}.sock"
        shutil.copyfile(self.base, image)
        try:
            cm: contextlib.AbstractContextManager[Server]
            if name in ("vhdxfs", BASELINE):
                cm = vhdxfs_server(name, image, sock, self.size, self.source if name == "vhdxfs" else self.baseline)
            elif name == "qemu-nbd":
                cm = child_server(name, qemu_nbd_cmd(image, sock), sock, self.work, self.size)
            else:
                env = {"PYTHONPATH": f"{REPO}:{self.site_packages}"}
                cm = child_server(name, nbdkit_cmd(image, sock), sock, self.work, self.size, env)
            with cm as srv:
                pin = self.args.pin_server
                if pin:  # every thread it has; the threads it starts later inherit the mask
                    run("taskset", "-a", "-p", "-c", pin, srv.pid)
                self.commands.setdefault(name, {"server": srv.cmd, "env": srv.env, "pinned_to": pin})
                yield srv
        finally:
            image.unlink(missing_ok=True)  # gigabytes once written
            os.sync()  # the host's writeback of this visit must not land on the next contender's time

    def fill(self, srv: Server) -> None:
        if job := self.unmeasured_fill():
            run(*self.fio_argv(srv.sock, job), timeout=900)
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
                    log(f"  {name:13} {job['name']:30} failed: {msg}")

    def sample(self, srv: Server, job: Job) -> None:
        """One measured run of job; again (up to --retries times) while others kept the machine busy during it,
        keeping the quietest attempt. Not the job into fresh space: a second run would find it written."""
        argv = self.fio_argv(srv.sock, job)
        self.commands.setdefault("fio", {})[job["name"]] = self.fio_argv(Path("SOCK"), job)
        tries = 1 if job.get("fills") else 1 + self.args.retries
        attempts: list[dict[str, Any]] = []
        for attempt in range(tries):
            # The daemons write through the host's page cache: a job must not share the machine with the
            # writeback of the one before it.
            os.sync()
            waited = wait_quiet(self.args.quiet_wait) if self.args.quiet_wait else 0.0
            cpu0, main0 = cpu_ticks(srv.pid), cpu_ticks(srv.pid, srv.pid)
            busy0, fio0, t0 = machine_busy_s(), children_cpu_s(), time.monotonic()
            s: dict[str, Any] = parse_fio(run(*argv, timeout=900).stdout, job)
            busy, fio_cpu, wall = machine_busy_s() - busy0, children_cpu_s() - fio0, time.monotonic() - t0
            cpu, main = cpu_ticks(srv.pid) - cpu0, cpu_ticks(srv.pid, srv.pid) - main0
            s |= {"cpu_us_per_io": cpu / TICK / s["ios"] * 1e6 if s["ios"] else None,
                  "main_cpu_us_per_io": main / TICK / s["ios"] * 1e6 if s["ios"] else None,
                  "fio_cpus": fio_cpu / wall, "daemon_cpus": cpu / TICK / wall,
                  # CPUs busy with anything but fio and the server (other processes, the kernel's writeback)
                  "other_cpus": max(0.0, busy - fio_cpu - cpu / TICK) / wall, "waited_s": waited}
            attempts.append(s)
            again = s["other_cpus"] > QUIET and attempt + 1 < tries
            log(f"  {srv.name:13} {job['name']:30} {headline(job, s):9.0f} {unit(job):5} "
                f"{s['cpu_us_per_io'] or 0:7.1f} us "
                f"CPU/req; CPUs busy: server {s['daemon_cpus']:.2f}, fio {s['fio_cpus']:.2f}, others "
                f"{s['other_cpus']:.2f}" + (f" (waited {waited:.0f} s)" if waited > 1 else "")
                + (" -> again" if again else ""))
            if not again:
                break
        best = min(attempts, key=lambda a: a["other_cpus"])
        if len(attempts) > 1:
            best = best | {"attempts": [{"value": headline(job, a), "other_cpus": a["other_cpus"]} for a in attempts]}
        self.keep(srv.name, job, best)

    def profile(self, out_dir: Path, stamp: str) -> None:
        """One more vhdxfs visit after the rounds, each --profile job under py-spy and strace (profiler.py)."""
        chosen = select(self.all_jobs, self.args.profile)
        log(f"profiling vhdxfs: {', '.join(j['name'] for j in chosen)}")
        self.visit_no = 0
        with self.server("vhdxfs") as srv:
            run(*self.fio_argv(srv.sock, self.all_jobs[0]), timeout=900)  # the profiled jobs find the span written
            for job in chosen:
                try:
                    self.profiles.append(profile_job(srv, job, self.fio_argv, self.args.profile_seconds,
                                                     self.args.strace_seconds, out_dir, stamp))
                except Unavailable as exc:
                    self.profiles.append({"job": job["name"], "error": str(exc)})
                    log(f"  profile {job['name']}: n/a ({exc})")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = options.parser("benchmarks/run-nbd", __doc__, CONTENDERS, OPTIONAL,
                        quick="smoke test: 256 MiB span and 4 s timed jobs",
                        rounds="A B B A passes (default 1: each contender visited twice); 0 with --profile: "
                               "profile only",
                        jobs_example="'rand read 4k' (every 4k read job) or 'rand read 4k QD1' (that one)")
    ap.add_argument("--profile", metavar="JOB,JOB",
                    help="then profile the vhdxfs daemon during these jobs (py-spy and strace -c), e.g. "
                         "'rand read 4k QD16,rand write 4k QD16'")
    ap.add_argument("--profile-seconds", type=float, default=8, help="py-spy's window per job (default 8)")
    ap.add_argument("--strace-seconds", type=float, default=5, help="the fio run under strace (default 5)")
    ap.add_argument("--vhdxfs-src", metavar="DIR",
                    help="run the vhdxfs contender from the code of checkout DIR (this venv's interpreter, "
                         "PYTHONPATH=DIR; see Baseline in harness/baseline.py), e.g. a worktree with a fix")
    ap.add_argument("--quiet-wait", type=float, default=60, metavar="SECONDS",
                    help=f"before each job, wait up to this long for the machine to be quiet (under {QUIET} CPUs "
                         "busy with other work); 0: do not wait (default 60)")
    ap.add_argument("--retries", type=int, default=2,
                    help=f"run a job again (up to this many times) when other work kept more than {QUIET} CPUs busy "
                         "during it, keeping the quietest attempt (default 2; never the job into fresh space)")
    ap.add_argument("--pin-server", metavar="CPUS",
                    help="pin the server (all its threads) to these CPUs (taskset list, e.g. 1; default: no pinning)")
    ap.add_argument("--pin-fio", metavar="CPUS", help="run fio pinned to these CPUs (e.g. 0; default: no pinning)")
    args = ap.parse_args(argv)
    options.finish(ap, args, "nbd", CONTENDERS + OPTIONAL, patterns=("jobs", "profile"))
    if args.rounds == 0 and not args.profile:
        ap.error("--rounds 0 needs --profile")
    if args.vhdxfs_src:
        src = checkout(args.vhdxfs_src)
        if isinstance(src, str):
            ap.error(f"--vhdxfs-src {src}")
        args.vhdxfs_src = src
    return args


def main() -> int:
    argv = sys.argv[1:]
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vhdxfs-nbd-bench-", dir=args.workdir))
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    nb = NbdBench(args, work)

    def body() -> None:
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

    if not session(work, body, tidy=stop_all_vhdxfs):
        return 130
    elapsed = time.monotonic() - T0
    text = report(nb, elapsed, argv)
    print(text)
    data = record(nb, stamp, elapsed, TOOLS)
    if args.vhdxfs_src:
        data["versions"]["vhdxfs_src"] = {"dir": str(args.vhdxfs_src), **git_state(args.vhdxfs_src)}
    data |= {"argv": argv, "commands": nb.commands, "job_errors": nb.job_errors, "profiles": nb.profiles}
    save_results(out, f"nbd-{stamp}", data, text)
    return 0

