"""What both front ends share about a run: the image, the jobs, the visiting order and the clean-up.

Contenders are visited A B C C B A per round, every visit on a fresh copy of one image, so that the drift
of a shared machine (it moves the same job by 1.5x between phases) cancels out of the medians instead of
landing on whichever contender ran last. A contender that fails once is n/a from then on, with its reason,
and the others go on: a missing vhdimount must not cost the rest of a long run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .baseline import Baseline
from .jobs import JOBS, Job, select
from .procs import CHILDREN, Interrupted, force_unmount, log, mounts_under, on_signal, reason, run, stop

Sample = dict[str, Any]  # one job's figures in one visit (jobs.parse_fio, and what a driver adds)


class Visits:
    """The state of a run and the visiting loop; a driver adds visit(name), one pass of its jobs."""

    front = ""  # "fuse" or "nbd": which jobs (jobs.JOBS)

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.base = work / "base.vhdx"
        self.size = 0
        self.span = 0
        self.all_jobs: list[Job] = []
        self.jobs: list[Job] = []
        self.results: dict[str, dict[str, list[Sample]]] = {}  # contender -> job -> one sample per visit
        self.errors: dict[str, str] = {}  # contender -> why it is n/a
        self.visit_no = 0
        self.baseline = Baseline(args.baseline) if args.baseline else None

    def prepare(self) -> None:
        """The one fresh dynamic image every visit copies, and the jobs sized to it."""
        run("qemu-img", "create", "-q", "-f", "vhdx", self.base, self.args.size)
        self.size = json.loads(run("qemu-img", "info", "--output=json", self.base).stdout)["virtual-size"]
        self.all_jobs = JOBS[self.front](self.args.quick, self.size, self.args.runtime)
        self.jobs = select(self.all_jobs, self.args.jobs)
        self.span = self.all_jobs[0]["size"]

    def unmeasured_fill(self) -> Job | None:
        """The job that writes the span, when --jobs left it out: it then runs unmeasured first, so the
        selected jobs still read or rewrite allocated blocks, as in a full run."""
        fill = next((j for j in self.all_jobs if j.get("fills")), None)
        return fill if fill is not None and fill not in self.jobs else None

    def contend(self) -> None:
        names = self.args.contenders
        order = (names + names[::-1]) * self.args.rounds
        for i, name in enumerate(order):
            if name in self.errors:
                continue  # failed once: n/a, do not retry on every visit
            log(f"visit {i + 1}/{len(order)}: {name}")
            self.visit_no = i + 1
            try:
                self.visit(name)
            except Exception as exc:  # a contender that cannot run is reported as n/a; the others go on
                self.errors[name] = reason(exc)
                log(f"  {name}: n/a ({self.errors[name]})")

    def visit(self, name: str) -> None:
        raise NotImplementedError

    def keep(self, name: str, job: Job, sample: Sample) -> None:
        """Record one visit's figures of a job, with the visit's number."""
        self.results.setdefault(name, {}).setdefault(job["name"], []).append(sample | {"visit": self.visit_no})


def session(work: Path, body: Callable[[], None], tidy: Callable[[], None] = lambda: None) -> bool:
    """Run body with SIGTERM (and SIGHUP, SIGINT unless started with them ignored, as by nohup or a shell's
    `&`) unwinding through every clean-up like Ctrl-C does. False if interrupted (then no report).

    Whatever happened: tidy() (a driver's own daemons), every child stopped, anything still mounted below
    the work dir unmounted lazily (so rmtree never walks into a FUSE mount), the work dir removed."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, on_signal)
    try:
        body()
    except (KeyboardInterrupt, Interrupted) as exc:
        log(f"interrupted ({exc}); cleaning up, no report")
        return False
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        tidy()
        for proc in CHILDREN:
            stop(proc, timeout=30)
        for point in mounts_under(work):
            log(f"stale mount {point}: unmounting")
            force_unmount(point)
        shutil.rmtree(work, ignore_errors=True)
    return True
