"""benchmarks/run: fio against the raw file each contender serves, side by side, reported as ratios.

Contenders (each gets its own copy of one fresh dynamic image made by `qemu-img create -f vhdx`):
  vhdxfs       `vhdxfs mount IMG MNT` -> MNT/<stem>.raw
  qsd          qemu-storage-daemon: QEMU's C vhdx driver behind its FUSE export (over a regular file)
  vhdimount    libvhdi's FUSE mount, read-only: read jobs only, on a copy QEMU filled with data
  passthrough  benchmarks/passthrough.py: pyfuse3 + trio serving a sparse raw file of the same size with no
               translation at all, through vhdxfs's own host I/O (the ceiling of this architecture)
  passthrough-threads (only if named in --contenders) the same with plain trio.to_thread + os.pread/pwrite
  vhdxfs-nopoll (only if named in --contenders) vhdxfs mounted with -o poll_us=0: its request loop sleeps as
               soon as no request is queued (the polling's A/B in one session)
  vhdxfs-base  (only with --baseline DIR) the same as vhdxfs, but the daemon runs the code of the checkout
               DIR (this repo's venv interpreter, PYTHONPATH=DIR): an A/B of two versions in one session.
               Visited right after vhdxfs; the table adds the ratio of medians vhdxfs/vhdxfs-base.

Jobs run with fio --direct=1 --ioengine=psync (as a VM with cache=none). Contenders are visited
A B C D D C B A (per --rounds) so drift of the machine cancels out; every visit starts from a fresh copy.
The table gives medians: MiB/s, and IOPS for 4k jobs, and the ratios vhdxfs/qsd and vhdxfs/passthrough.
--jobs runs a subset of the jobs (a pattern equal to a job's name picks it, otherwise every job whose name
contains it); a selected job that reads or rewrites the span still finds it filled by the first job, run
unmeasured. Every visit's figures are in the JSON.
It also measures the peak RSS of the vhdxfs daemon and of qemu-storage-daemon with a 64 TiB image open, and
the time to open that image (`vhdxfs info` next to `qemu-img info`); --no-footprint skips that.
A contender that is missing or fails is reported as n/a with the reason; the others go on. Everything is
written to benchmarks/results/<timestamp>.{json,md}.
The NBD front end is benchmarks/run-nbd (harness/nbd.py); both share harness/jobs.py, visits.py and results.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from . import options
from .baseline import BASELINE
from .footprint import footprint, footprint_text
from .fuse_mounts import passthrough, qsd, vhdimount, vhdxfs
from .jobs import Job, fio, headline, unit
from .procs import T0, MiB, log, run
from .results import (
    comparison_lines,
    machine,
    machine_line,
    medians,
    noisy_lines,
    ratio_table,
    record,
    save_results,
)
from .visits import Visits, session

CONTENDERS = ("vhdxfs", "qsd", "vhdimount", "passthrough")  # the default set, in visiting order
OPTIONAL = ("passthrough-threads", "vhdxfs-nopoll")  # only when named in --contenders
RATIOS = ("qsd", "passthrough")  # the columns vhdxfs/<ref> (and vhdxfs/vhdxfs-base with --baseline)


class FuseBench(Visits):
    """One visit: a fresh mount of the contender, every selected job on it (the fresh-space job on a
    second fresh mount), then the visit's copies deleted and synced away."""

    front = "fuse"

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        super().__init__(args, work)
        self.vhdi_image: Path | None = None
        self.scratch: list[Path] = []  # image copies of the current visit, deleted after it

    def copy(self, name: str) -> Path:
        """A fresh copy of the base image (a dynamic VHDX: a few MiB)."""
        path = self.work / f"{name}.vhdx"
        shutil.copyfile(self.base, path)
        self.scratch.append(path)
        return path

    def sparse(self) -> Path:
        path = self.work / "pt.img"
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            f.truncate(self.size)
        self.scratch.append(path)
        return path

    def mount(self, name: str) -> contextlib.AbstractContextManager[Path]:
        """A fresh instance of a contender: a context manager over its raw file."""
        if name == "vhdxfs":
            return vhdxfs(self.copy("disk"), self.work / "mnt-vhdxfs")
        if name == "vhdxfs-nopoll":
            return vhdxfs(self.copy("disk-np"), self.work / "mnt-vhdxfs-nopoll", options="poll_us=0")
        if name == BASELINE:
            return vhdxfs(self.copy("disk-b"), self.work / "mnt-vhdxfs-base", self.baseline)
        if name == "qsd":
            return qsd(self.copy("qsd"), self.work)
        if name == "passthrough":
            return passthrough(self.sparse(), self.work)
        if name == "passthrough-threads":
            return passthrough(self.sparse(), self.work, io="threads")
        return vhdimount(self.filled_vhdi_image(), self.work)

    def filled_vhdi_image(self) -> Path:
        """vhdimount cannot write: its copy is filled once by QEMU (qemu-io, 256 MiB per request)."""
        if self.vhdi_image is None:
            image = self.work / "vhdi.vhdx"  # kept for every visit: vhdimount only reads it
            shutil.copyfile(self.base, image)
            step = min(256 * MiB, self.span)
            cmds = [a for off in range(0, self.span, step) for a in ("-c", f"write -q -P 0x5a {off} {step}")]
            run("qemu-io", "-f", "vhdx", *cmds, image, timeout=900)
            self.vhdi_image = image
        return self.vhdi_image

    def visit(self, name: str) -> None:
        """One pass of every job over a fresh instance of the contender."""
        todo = [j for j in self.jobs if not (name == "vhdimount" and j["writes"])]
        steady = [j for j in todo if not j.get("fresh")]
        # vhdimount's image is filled by QEMU already.
        prep = self.unmeasured_fill() if steady and name != "vhdimount" else None
        try:
            if steady:
                with self.mount(name) as raw:
                    if prep:
                        os.sync()
                        fio(raw, prep)
                        log(f"  {name:13} ({prep['name']}: unmeasured, fills the span)")
                    for job in steady:
                        self.sample(name, job, raw)
            for job in todo:
                if job.get("fresh"):  # on a second fresh copy
                    with self.mount(name) as raw:
                        self.sample(name, job, raw)
        finally:
            for path in self.scratch:  # the visit's copies: gigabytes once written
                path.unlink(missing_ok=True)
            self.scratch.clear()
            os.sync()  # the host's writeback of this visit must not land on the next contender's time

    def sample(self, name: str, job: Job, raw: Path) -> None:
        # Every daemon writes to the host through its page cache. Without a sync, a job would share the
        # CPUs and the disk with the writeback of the job before it (4 GiB after the seq writes of a full
        # run): the read that follows varied 2.5x between visits.
        os.sync()
        s = fio(raw, job)
        self.keep(name, job, s)
        log(f"  {name:13} {job['name']:36} {headline(job, s):9.0f} {unit(job)}")


# -- report ----------------------------------------------------------------------------------------------
def table(bench: Visits) -> str:
    med = medians(bench)

    def cell(job: Job, c: str) -> str:
        if c == "vhdimount" and job["writes"]:
            return "—"  # read-only mount
        if (v := med.get(c, {}).get(job["name"])) is None:
            return "n/a"
        return f"{v:.0f} ({v * 4 / 1024:.1f})" if job["bs"] == "4k" else f"{v:.0f}"

    lines = ratio_table(bench, RATIOS, header=str, cell=cell,
                        unit_of=lambda job: "IOPS (MiB/s)" if job["bs"] == "4k" else "MiB/s")
    return "\n".join(lines + noisy_lines(bench) + comparison_lines(bench))


def report(bench: Visits, extra: dict[str, Any], elapsed: float) -> str:
    args = bench.args
    text = table(bench)
    text += (f"\n\nMedians of {args.rounds * 2} visits per contender. Image {args.size} "
             f"({'quick' if args.quick else 'full'} run: {bench.span // MiB} MiB spans, "
             f"{args.runtime:g} s random jobs), fio direct=1 psync; run took {elapsed / 60:.1f} min.\n"
             f"{machine_line(machine(args.workdir))}\n")
    text += footprint_text(extra)
    for name, err in bench.errors.items():
        text += f"\n{name}: n/a ({err})"
    return text.rstrip() + "\n"


def main() -> int:
    ap = options.parser("benchmarks/run", __doc__, CONTENDERS, OPTIONAL,
                        quick="smoke test: 256 MiB spans and 4 s random jobs (about 2 minutes)",
                        rounds="A B C D D C B A passes (default 1: each contender visited twice)",
                        jobs_example="'rand read' (both 4k read jobs), 'rand read 4k' (that one) or 'fsync'")
    ap.add_argument("--no-footprint", action="store_true", help="skip the 64 TiB RSS and open-time figures")
    args = ap.parse_args()
    options.finish(ap, args, "fuse", CONTENDERS + OPTIONAL)

    work = Path(tempfile.mkdtemp(prefix="vhdxfs-bench-", dir=args.workdir))
    bench = FuseBench(args, work)
    extra: dict[str, Any] = {}

    def body() -> None:
        nonlocal extra
        bench.prepare()
        log(f"image {args.size}, spans {bench.span // MiB} MiB, work dir {work}, "
            f"{len(bench.jobs)} of {len(bench.all_jobs)} jobs, contenders {', '.join(args.contenders)}")
        bench.contend()
        if not args.no_footprint:
            extra = footprint(work, args.quick)

    if not session(work, body):
        return 130
    text = report(bench, extra, time.monotonic() - T0)
    print(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = record(bench, stamp, time.monotonic() - T0, {"vhdimount": ["vhdimount", "-V"]})
    save_results(args.results, stamp, data | {"footprint": extra}, text)
    return 0

