"""benchmarks/run: fio against the raw file each contender serves, side by side, reported as ratios.

Contenders (each gets its own copy of one fresh dynamic image made by `qemu-img create -f vhdx`):
  vhdxfs       `vhdxfs mount IMG MNT` -> MNT/<stem>.raw
  qsd          qemu-storage-daemon: QEMU's C vhdx driver behind its FUSE export (over a regular file)
  vhdimount    libvhdi's FUSE mount, read-only: read jobs only, on a copy QEMU filled with data
  passthrough  benchmarks/passthrough.py: pyfuse3 + trio serving a sparse raw file of the same size with no
               translation at all, through vhdxfs's own host I/O (the ceiling of this architecture)
  passthrough-threads (only if named in --contenders) the same with plain trio.to_thread + os.pread/pwrite
  vhdxfs-base  (only with --baseline DIR) the same as vhdxfs, but the daemon runs the code of the checkout
               DIR (this repo's venv interpreter, PYTHONPATH=DIR): an A/B of two versions in one session.
               Visited right after vhdxfs; the table adds the ratio of medians vhdxfs/vhdxfs-base.

Jobs run with fio --direct=1 --ioengine=psync (as a VM with cache=none). Contenders are visited
A B C D D C B A (per --rounds) so drift of the machine cancels out; every visit starts from a fresh copy.
The table gives medians: MiB/s, and IOPS for 4k jobs, and the ratios vhdxfs/qsd and vhdxfs/passthrough.
--jobs runs a subset of the jobs (substring match on their names); a selected job that reads or rewrites
the span still finds it filled by the first job, run unmeasured. Every visit's figures are in the JSON.
It also measures the vhdxfs daemon's peak RSS with a 64 TiB image open and the time to open that image
(`vhdxfs info` next to `qemu-img info`). A contender that is missing or fails is reported as n/a with the
reason; the others go on. Everything is written to benchmarks/results/<timestamp>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV = REPO / ".venv" / "bin"
PYTHON = VENV / "python" if (VENV / "python").exists() else Path(sys.executable)
MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
CONTENDERS = ("vhdxfs", "qsd", "vhdimount", "passthrough")  # the default set, in visiting order
OPTIONAL = ("passthrough-threads",)  # only when named in --contenders
BASELINE = "vhdxfs-base"  # only with --baseline DIR
T0 = time.monotonic()


class Unavailable(Exception):
    """A contender (or a measurement) that cannot run here; the message is the reason shown as n/a."""


class Interrupted(BaseException):
    """A signal (SIGTERM, SIGHUP, SIGINT): unwinds through every clean-up."""


def on_signal(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def reason(exc: Exception) -> str:
    """What to print for a failure: our own messages as they are, anything else with its type."""
    return str(exc) if isinstance(exc, Unavailable) else f"{type(exc).__name__}: {exc}"


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": TiB}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def run(*args, timeout: float = 600, check: bool = True, env: dict | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command; on failure raise Unavailable with the last lines it printed.

    The command gets its own process group, and the whole group is killed if we are interrupted or it
    times out: fio's job processes must not live on holding a mounted file open.
    """
    argv = [str(a) for a in args]
    label = " ".join(argv[2:4] if argv[1:2] == ["-m"] else [Path(argv[0]).name, argv[1]])  # python -m mod cmd
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=env, cwd=cwd)
    except FileNotFoundError:
        raise Unavailable(f"{argv[0]} is not installed") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise Unavailable(f"{label}: no answer in {timeout:.0f} s") from None
        raise
    if check and proc.returncode != 0:
        said = " / ".join((err.strip() or out.strip() or "no output").splitlines()[-3:])
        raise Unavailable(f"{label} failed ({proc.returncode}): {said}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise Unavailable(f"timed out waiting for {what}")
        time.sleep(0.05)


def vhdxfs_bin() -> Path:
    """$VHDXFS if set, else the venv's console script, else one on PATH."""
    if os.environ.get("VHDXFS"):
        return Path(os.environ["VHDXFS"])
    if (VENV / "vhdxfs").exists():
        return VENV / "vhdxfs"
    found = shutil.which("vhdxfs")
    if not found:
        raise Unavailable("no vhdxfs command (run ./setup.sh)")
    return Path(found)


class Baseline:
    """How to run the vhdxfs of another checkout: `PYTHON -m vhdxfs.cli ...` with DIR first on sys.path.

    Why the daemon runs DIR's code and not this repo's (the editable install in the venv):
    - `vhdxfs mount` daemonizes by os.fork() without exec (vhdxfs/mount/command.py), so the daemon is the
      very process we start here: the modules it imported, and any it imports later, come from its sys.path.
    - That sys.path starts with PYTHONPATH=DIR. PYTHONSAFEPATH=1 keeps `python -m` from putting the working
      directory in front of it (started from /work/main, that would win and load this repo's vhdxfs/), and
      we start it in DIR anyway. The editable install is a meta-path finder that setuptools *appends* after
      the regular path finder: it only answers for names that sys.path cannot find, and DIR/vhdxfs is found.
    - Checked, not assumed: check() imports vhdxfs.cli (and every subcommand's module) with the same
      interpreter, environment and directory and refuses unless every vhdxfs module comes from DIR; and
      after each mount, daemon() finds the daemon by its mount point and checks its /proc/<pid>/environ.
    """

    def __init__(self, src: Path) -> None:
        self.src = src
        self.cmd = [PYTHON, "-m", "vhdxfs.cli"]
        self.env = dict(os.environ, PYTHONPATH=str(src), PYTHONSAFEPATH="1")
        self.checked = False

    PROBE = ("import sys, vhdxfs.cli as cli\n"
             "getattr(cli, 'build_parser', lambda: None)()  # imports every subcommand's module\n"
             "print('\\n'.join(sorted({getattr(m, '__file__', None) or '?' for n, m in list(sys.modules.items())\n"
             "                          if n.split('.')[0] == 'vhdxfs'})))")

    def check(self) -> None:
        if self.checked:
            return
        files = run(PYTHON, "-c", self.PROBE, env=self.env, cwd=self.src, timeout=60).stdout.split()
        stray = [f for f in files if not Path(f).resolve().is_relative_to(self.src)]
        if not files or stray:
            raise Unavailable(f"vhdxfs of {self.src} would load {stray[0] if stray else 'nothing'}")
        self.checked = True

    def daemon(self, mnt: Path) -> int:
        """The pid of the daemon serving mnt, which must have been started with PYTHONPATH=DIR."""
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if proc.name.isdigit() and str(mnt).encode() in (proc / "cmdline").read_bytes().split(b"\0"):
                    if f"PYTHONPATH={self.src}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                        return int(proc.name)
        raise Unavailable(f"no daemon started with PYTHONPATH={self.src} serves {mnt}")


# -- mounts and processes: everything we start is stopped again, whatever happens ------------------------
def mounts_under(root: Path) -> list[str]:
    """Mount points at or below root, deepest first (from /proc/self/mountinfo; octal escapes decoded)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == str(root) or point.startswith(str(root) + "/"):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def force_unmount(point: str | Path) -> None:
    """Lazy unmount: never blocks, even when the daemon behind it is stuck or gone."""
    for cmd in (["fusermount3", "-u", "-z", str(point)], ["umount", "-l", str(point)]):
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            return


CHILDREN: list[subprocess.Popen] = []  # daemons we started in the foreground, stopped at the latest on exit


def spawn(args: list, log_path: Path, **kw) -> subprocess.Popen:
    with log_path.open("w") as out:
        proc = subprocess.Popen([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT, **kw)
    CHILDREN.append(proc)
    return proc


def stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM (both FUSE daemons flush and unmount on it), SIGKILL if it does not end in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def is_mounted(path: Path) -> bool:
    return str(path) in mounts_under(path)


# -- contenders: context managers yielding the raw file to benchmark ------------------------------------
@contextlib.contextmanager
def vhdxfs(image: Path, mnt: Path, base: Baseline | None = None) -> Iterator[Path]:
    """vhdxfs mount/umount: this repo's (vhdxfs_bin), or with base the code of another checkout (both)."""
    if base:
        base.check()
    cmd, how = (base.cmd, dict(env=base.env, cwd=base.src)) if base else ([vhdxfs_bin()], {})
    mnt.mkdir(exist_ok=True)
    run(*cmd, "mount", image, mnt, timeout=120, **how)
    try:
        if base:
            base.daemon(mnt)
        raw = mnt / (image.stem + ".raw")
        if not raw.exists():
            raise Unavailable(f"vhdxfs mount gave no {raw.name}")
        yield raw
    finally:
        try:
            run(*cmd, "umount", mnt, timeout=300, **how)
        except Unavailable as exc:
            log(f"vhdxfs umount: {exc}; unmounting lazily")
            force_unmount(mnt)


def vhdxfs_pid(mnt: Path) -> int:
    """The daemon serving mnt: from its state file (vhdxfs.mount.daemon), else by its command line."""
    with contextlib.suppress(Exception):
        sys.path.insert(0, str(REPO))
        from vhdxfs.mount.daemon import state_file

        return int(state_file(mnt).read_text().split()[0])
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if proc.name.isdigit() and any(b"vhdxfs" in a for a in argv[:3]) and str(mnt).encode() in argv:
                return int(proc.name)
    raise Unavailable("cannot find the vhdxfs daemon's pid")


def qsd_start(image: Path, work: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """qemu-storage-daemon exporting image over FUSE on the regular file work/<name>.raw."""
    target = work / f"{name}.raw"
    target.touch()  # a FUSE export mounts over an existing regular file
    try:
        proc = spawn(["qemu-storage-daemon",
                      "--blockdev", f"driver=file,node-name=file,filename={image},cache.direct=off",
                      "--blockdev", "driver=vhdx,node-name=disk,file=file",
                      "--export", f"type=fuse,id=exp,node-name=disk,mountpoint={target},writable=on,allow-other=off"],
                     work / f"{name}.log")
    except FileNotFoundError:
        raise Unavailable("qemu-storage-daemon is not installed") from None
    try:
        wait_for(lambda: proc.poll() is not None or is_mounted(target), "qemu-storage-daemon's export")
        if proc.poll() is not None:
            said = (work / f"{name}.log").read_text().strip() or f"exit status {proc.returncode}"
            raise Unavailable(f"qemu-storage-daemon: {said}")
    except BaseException:
        stop(proc)
        raise
    return proc, target


@contextlib.contextmanager
def qsd(image: Path, work: Path) -> Iterator[Path]:
    proc, target = qsd_start(image, work, "qsd")
    try:
        yield target
    finally:
        stop(proc)
        if is_mounted(target):
            force_unmount(target)


@contextlib.contextmanager
def vhdimount(image: Path, work: Path) -> Iterator[Path]:
    mnt = work / "mnt-vhdi"
    mnt.mkdir(exist_ok=True)
    run("vhdimount", image, mnt, timeout=60)  # daemonises once mounted
    try:
        raw = mnt / "vhdi1"
        if not raw.exists():
            raise Unavailable("vhdimount gave no vhdi1")
        yield raw
    finally:
        if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode != 0:
            force_unmount(mnt)


@contextlib.contextmanager
def passthrough(raw_file: Path, work: Path, io: str = "hostfile") -> Iterator[Path]:
    mnt = work / f"mnt-pt-{io}"
    mnt.mkdir(exist_ok=True)
    proc = spawn([PYTHON, HERE / "passthrough.py", "--io", io, raw_file, mnt], work / "passthrough.log",
                 env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        wait_for(lambda: proc.poll() is not None or is_mounted(mnt), "passthrough.py to mount")
        if proc.poll() is not None:
            said = (work / "passthrough.log").read_text().strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(f"passthrough.py exited {proc.returncode}: {said[0]}")
        yield mnt / "disk.raw"
    finally:
        stop(proc)  # it unmounts on SIGTERM
        if is_mounted(mnt):
            force_unmount(mnt)


# -- jobs ------------------------------------------------------------------------------------------------
def jobs(quick: bool, image_size: int) -> list[dict]:
    """The fio jobs, in the order one visit runs them. span: how much of the disk a job touches."""
    span = min(256 * MiB if quick else 2 * GiB, image_size // 4 // MiB * MiB)
    t = 4 if quick else 12  # seconds of each time-based random job (4 of them per visit dominate the run)
    return [
        # Writes 1 MiB blocks into never-written space: vhdxfs and qsd allocate payload blocks and grow the
        # file (the passthrough's host file system allocates too). Runs first, on the visit's fresh copy.
        dict(name="seq write 1M, fresh", rw="write", bs="1M", size=span, writes=True, fills=True),
        # The same span again: every block is allocated now, pure data path.
        dict(name="seq write 1M, allocated", rw="write", bs="1M", size=span, writes=True),
        dict(name="seq read 1M", rw="read", bs="1M", size=span),
        dict(name="rand read 4k", rw="randread", bs="4k", size=span, runtime=t),
        # Into the span the first job allocated: no allocation, the pure 4 KiB data path.
        dict(name="rand write 4k", rw="randwrite", bs="4k", size=span, runtime=t, writes=True),
        # Four threads at once: how well requests overlap (queue depth 4 through FUSE).
        dict(name="rand read 4k, 4 jobs", rw="randread", bs="4k", size=span, runtime=t, numjobs=4),
        # What users of a long-lived image see: a journaling guest allocating in an image that already
        # holds data (the span above), the untouched span above it. Every visit has its own fresh copy, so
        # every visit finds that span untouched.
        dict(name="rand write 4k fsync/32, filled image", rw="randwrite", bs="4k", size=span, offset=span,
             runtime=t, fsync=32, writes=True),
        # A journaling guest: an fsync every 32 writes, into fresh space (allocation + metadata flushes).
        # Runs on a second fresh copy, in the span above the first one.
        dict(name="rand write 4k fsync/32, fresh", rw="randwrite", bs="4k", size=span, offset=span,
             runtime=t, fsync=32, writes=True, fresh=True),
    ]


def fio(raw: Path, job: dict) -> dict:
    """Run one fio job against raw; returns MiB/s, IOPS and completion latency (us) of its one side."""
    args = ["fio", "--output-format=json", "--direct=1", "--ioengine=psync", f"--filename={raw}",
            "--name=job", f"--rw={job['rw']}", f"--bs={job['bs']}", f"--size={job['size']}",
            f"--offset={job.get('offset', 0)}", "--group_reporting", "--randrepeat=0"]
    if "runtime" in job:
        args += [f"--runtime={job['runtime']}", "--time_based"]
    if "numjobs" in job:
        args += [f"--numjobs={job['numjobs']}"]
    if "fsync" in job:
        args += [f"--fsync={job['fsync']}"]
    if job.get("end_fsync"):
        args += ["--end_fsync=1"]
    out = run(*args, timeout=900).stdout
    data = json.loads(out[out.index("{"):])  # fio may print notes before the JSON
    result = data["jobs"][0]
    side = result["write"] if "write" in job["rw"] else result["read"]
    if result.get("error"):
        raise Unavailable(f"fio: error {result['error']} on {raw.name}")
    pct = side["clat_ns"].get("percentile", {})
    return {"mib_s": side["bw_bytes"] / MiB, "iops": side["iops"],
            "clat_mean_us": side["clat_ns"]["mean"] / 1000,
            "clat_p99_us": pct.get("99.000000", 0) / 1000}


def headline(job: dict, sample: dict) -> float:
    return sample["iops"] if job["bs"] == "4k" else sample["mib_s"]


def select(all_jobs: list[dict], patterns: list[str] | None) -> list[dict]:
    """--jobs: the jobs whose name contains one of the patterns (case-insensitive), in their usual order."""
    if not patterns:
        return all_jobs
    return [j for j in all_jobs if any(p.lower() in j["name"].lower() for p in patterns)]


# -- the run ---------------------------------------------------------------------------------------------
class Visits:
    """Visiting contenders A B ... B A per round; a contender that fails once is n/a from then on. The class
    using it has ``args.contenders``, ``args.rounds``, ``errors`` and ``visit(name)``."""

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


class Bench(Visits):
    def __init__(self, args, work: Path) -> None:
        self.args = args
        self.work = work
        self.base = work / "base.vhdx"
        self.size = 0
        self.results: dict[str, dict[str, list[dict]]] = {}  # contender -> job -> one sample per visit
        self.baseline = Baseline(args.baseline) if args.baseline else None
        self.visit_no = 0
        self.errors: dict[str, str] = {}
        self.vhdi_image: Path | None = None
        self.scratch: list[Path] = []  # image copies of the current visit, deleted after it

    def prepare(self) -> None:
        run("qemu-img", "create", "-q", "-f", "vhdx", self.base, self.args.size)
        self.size = json.loads(run("qemu-img", "info", "--output=json", self.base).stdout)["virtual-size"]
        self.all_jobs = jobs(self.args.quick, self.size)
        self.jobs = select(self.all_jobs, self.args.jobs)
        self.span, self.runtime = self.all_jobs[0]["size"], self.all_jobs[3]["runtime"]

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

    def mount(self, name: str):
        """A fresh instance of a contender: a context manager over its raw file."""
        if name == "vhdxfs":
            return vhdxfs(self.copy("disk"), self.work / "mnt-vhdxfs")
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
            span = self.span
            step = min(256 * MiB, span)
            cmds = [a for off in range(0, span, step) for a in ("-c", f"write -q -P 0x5a {off} {step}")]
            run("qemu-io", "-f", "vhdx", *cmds, image, timeout=900)
            self.vhdi_image = image
        return self.vhdi_image

    def visit(self, name: str) -> None:
        """One pass of every job over a fresh instance of the contender."""
        todo = [j for j in self.jobs if not (name == "vhdimount" and j.get("writes"))]
        steady = [j for j in todo if not j.get("fresh")]
        # With --jobs, the jobs after the first one must still find the span written (allocated, data in
        # it): the first job then runs unmeasured. vhdimount's image is filled by QEMU already.
        fill = next((j for j in self.all_jobs if j.get("fills")), None)
        prep = fill if steady and fill not in self.jobs and name != "vhdimount" else None
        try:
            if steady:
                with self.mount(name) as raw:
                    if prep:
                        os.sync()
                        fio(raw, prep)
                        log(f"  {name:11} ({prep['name']}: unmeasured, fills the span)")
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

    def sample(self, name: str, job: dict, raw: Path) -> None:
        # Every daemon writes to the host through its page cache. Without a sync, a job would share the
        # CPUs and the disk with the writeback of the job before it (4 GiB after the seq writes of a full
        # run): the read that follows varied 2.5x between visits.
        os.sync()
        s = fio(raw, job) | {"visit": self.visit_no}
        self.results.setdefault(name, {}).setdefault(job["name"], []).append(s)
        unit = "IOPS" if job["bs"] == "4k" else "MiB/s"
        log(f"  {name:11} {job['name']:30} {headline(job, s):9.0f} {unit}")

    # -- footprint: memory with a huge image open, and the time to open one ------------------------------
    def footprint(self) -> dict:
        big = self.work / "big.vhdx"
        out: dict = {}
        try:
            run("qemu-img", "create", "-q", "-f", "vhdx", big, "64T")
        except Unavailable as exc:
            return {"error": str(exc)}
        log("footprint: 64 TiB image")
        for key, measure in (("vhdxfs_peak_rss_mib", self.vhdxfs_rss), ("qsd_peak_rss_mib", self.qsd_rss)):
            try:
                out[key] = measure(big)
            except Exception as exc:
                out[key] = None
                out[key + "_error"] = reason(exc)
        for key, program in (("vhdxfs_info", vhdxfs_bin), ("qemu_img_info", lambda: "qemu-img")):
            try:
                out[key + "_s"] = self.timing([program(), "info", big])
            except Exception as exc:
                out[key + "_s"] = None
                out[key + "_error"] = reason(exc)
        return out

    @staticmethod
    def touch_big(raw: Path) -> None:
        """Read 64 KiB at every TiB of the disk, so the daemon has really served requests all over it."""
        with open(raw, "rb", buffering=0) as f:
            for off in range(0, 64 * TiB, TiB):
                os.pread(f.fileno(), 65536, off)

    def vhdxfs_rss(self, big: Path) -> float:
        mnt = self.work / "mnt-big"
        with vhdxfs(big, mnt) as raw:
            self.touch_big(raw)
            return peak_rss_mib(vhdxfs_pid(mnt))

    def qsd_rss(self, big: Path) -> float:
        proc, target = qsd_start(big, self.work, "qsd-big")
        try:
            self.touch_big(target)
            return peak_rss_mib(proc.pid)
        finally:
            stop(proc)
            if is_mounted(target):
                force_unmount(target)

    def timing(self, cmd: list) -> dict:
        """Wall time of a short command: hyperfine if installed, else a median of N runs."""
        cmd = [str(c) for c in cmd]
        n = 5 if self.args.quick else 20
        run(*cmd)  # fails loudly (n/a) if the command does not work at all; also warms the cache
        if shutil.which("hyperfine"):
            export = self.work / "hyperfine.json"
            run("hyperfine", "-N", "--warmup", "2", "--runs", str(n), "--export-json", export,
                " ".join(cmd))
            r = json.loads(export.read_text())["results"][0]
            return {"median": r["median"], "min": r["min"], "runs": n, "tool": "hyperfine"}
        times = []
        for _ in range(n):
            t = time.perf_counter()
            run(*cmd)
            times.append(time.perf_counter() - t)
        return {"median": statistics.median(times), "min": min(times), "runs": n, "tool": "loop"}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise Unavailable(f"no VmHWM for pid {pid}")


# -- report ----------------------------------------------------------------------------------------------
def save_results(results: str | Path, name: str, record: dict, text: str) -> None:
    """results/<name>.json (every figure) and results/<name>.md (the report), for all three harnesses."""
    out = Path(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    (out / f"{name}.md").write_text(text)
    log(f"saved {out / name}.json and .md")


def machine(workdir: str) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, StopIteration):
        mem = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
                  .split()[1]) // (1 << 20)
    fs = " on ".join(subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", workdir],
                                    capture_output=True, text=True).stdout.split())
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "mem_gib": mem, "workdir_fs": fs}


def git_state(checkout: Path) -> dict:
    """Commit of a checkout, and whether its vhdxfs/ differs from it (a work in progress is measured)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True).stdout.strip()
    with contextlib.suppress(OSError):
        return {"commit": git("rev-parse", "--short", "HEAD"),
                "vhdxfs_modified": bool(git("status", "--porcelain", "--", "vhdxfs"))}
    return {}


def versions(baseline: Path | None = None) -> dict:
    out = {}
    for name, cmd in (("fio", ["fio", "--version"]), ("qemu", ["qemu-img", "--version"]),
                      ("vhdimount", ["vhdimount", "-V"])):
        with contextlib.suppress(OSError):
            text = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
            out[name] = text.splitlines()[0] if text else ""
    state = git_state(REPO)
    out["vhdxfs_commit"], out["vhdxfs_modified"] = state.get("commit"), state.get("vhdxfs_modified")
    if baseline:
        out["baseline"] = {"dir": str(baseline), **git_state(baseline)}
    return out


def medians(bench: Bench) -> dict[str, dict[str, float]]:
    """contender -> job -> median of its visits' headline figure (jobs without a sample left out)."""
    return {c: {j: statistics.median(headline(job, s) for s in bench.results.get(c, {}).get(j, [])) for job in
                bench.jobs if (j := job["name"]) in bench.results.get(c, {})} for c in bench.args.contenders}


def comparison(bench: Bench) -> dict:
    """vhdxfs against vhdxfs-base per job: every visit's figure (visiting order) and the ratio of medians."""
    med, out = medians(bench), {}
    for job in bench.jobs:
        j = job["name"]
        a, b = med.get("vhdxfs", {}).get(j), med.get(BASELINE, {}).get(j)
        out[j] = {"unit": "IOPS" if job["bs"] == "4k" else "MiB/s",
                  **{c: [headline(job, s) for s in bench.results.get(c, {}).get(j, [])] for c in ("vhdxfs", BASELINE)},
                  "ratio_of_medians": a / b if a and b else None}
    return out


def table(bench: Bench) -> str:
    names = bench.args.contenders
    med = medians(bench)
    refs = [r for r in ("qsd", "passthrough") if r in names and "vhdxfs" in names]  # the ratio columns
    if BASELINE in names:
        refs.append(BASELINE)  # shown even without vhdxfs (then n/a): the run was an A/B
    lines = ["| job | unit | " + " | ".join(names + [f"vhdxfs/{r}" for r in refs]) + " |",
             "|---|---|" + "---:|" * (len(names) + len(refs))]
    for job in bench.jobs:
        j = job["name"]
        four_k = job["bs"] == "4k"
        cells = []
        for c in names:
            if c == "vhdimount" and job.get("writes"):
                cells.append("—")  # read-only mount
            elif j in med[c]:
                cells.append(f"{med[c][j]:.0f} ({med[c][j] * 4 / 1024:.1f})" if four_k else f"{med[c][j]:.0f}")
            else:
                cells.append("n/a")
        v = med.get("vhdxfs", {}).get(j)
        for r in refs:
            d = med[r].get(j)
            cells.append(f"{v / d:.2f}x" if v and d else "n/a")
        unit = "IOPS (MiB/s)" if four_k else "MiB/s"
        lines.append(f"| {j} | {unit} | " + " | ".join(cells) + " |")
    noisy = []  # cells whose visits disagree by more than 25%: read them with care
    for job in bench.jobs:
        for c in names:
            values = [headline(job, s) for s in bench.results.get(c, {}).get(job["name"], [])]
            if len(values) > 1 and min(values) > 0 and max(values) / min(values) > 1.25:
                noisy.append(f"{job['name']} / {c}: {min(values):.0f}–{max(values):.0f}")
    if noisy:
        lines += ["", "Visits differing by more than 25% (min–max): " + "; ".join(noisy) + "."]
    if BASELINE in names:
        lines += ["", f"vhdxfs against {BASELINE} (baseline {bench.args.baseline}), every visit in visiting order:"]
        for j, row in comparison(bench).items():
            ratio = row["ratio_of_medians"]
            flag = " (below 0.95)" if ratio is not None and ratio < 0.95 else ""
            lines.append(f"- {j} ({row['unit']}): vhdxfs " + (", ".join(f"{v:.0f}" for v in row["vhdxfs"]) or "n/a")
                         + f"; {BASELINE} " + (", ".join(f"{v:.0f}" for v in row[BASELINE]) or "n/a")
                         + "; ratio of medians " + ("n/a" if ratio is None else f"{ratio:.3f}") + flag)
    return "\n".join(lines)


def fmt(value, spec: str, unit: str) -> str:
    return "n/a" if value is None else f"{value:{spec}} {unit}"


def report(bench: Bench, extra: dict, elapsed: float) -> str:
    args, m = bench.args, machine(bench.args.workdir)
    samples = args.rounds * 2
    text = table(bench)
    text += (f"\n\nMedians of {samples} visits per contender. Image {args.size} "
             f"({'quick' if args.quick else 'full'} run: {bench.span // MiB} MiB spans, "
             f"{bench.runtime} s random jobs), fio direct=1 psync; run took {elapsed / 60:.1f} min.\n"
             f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_gib']} GiB RAM, Linux {m['kernel']}, "
             f"images on {m['workdir_fs'] or '?'}.\n")
    if not extra:
        pass  # --no-footprint
    elif "error" in extra:
        text += f"\n64 TiB image: n/a ({extra['error']})\n"
    else:
        def t(key):
            v = extra.get(key + "_s")
            return "n/a" if v is None else f"{v['median'] * 1000:.0f} ms"
        text += (f"\nWith a 64 TiB image open (64 KiB read at every TiB): peak RSS of the vhdxfs daemon "
                 f"{fmt(extra.get('vhdxfs_peak_rss_mib'), '.1f', 'MiB')}, of qemu-storage-daemon "
                 f"{fmt(extra.get('qsd_peak_rss_mib'), '.1f', 'MiB')}.\n"
                 f"Time to open it (median): `vhdxfs info` {t('vhdxfs_info')}, `qemu-img info` {t('qemu_img_info')}.\n")
        for key in ("vhdxfs_peak_rss_mib_error", "qsd_peak_rss_mib_error", "vhdxfs_info_error",
                    "qemu_img_info_error"):
            if key in extra:
                text += f"- {key.removesuffix('_error')}: n/a ({extra[key]})\n"
    for name, err in bench.errors.items():
        text += f"\n{name}: n/a ({err})"
    return text.rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="8G", help="virtual size of the test image (default 8G)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 256 MiB spans and 4 s random jobs (about 2 minutes)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="A B C D D C B A passes (default 1: each contender visited twice)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help=f"comma-separated, from {','.join(CONTENDERS + OPTIONAL + (BASELINE,))} (default: "
                         f"{','.join(CONTENDERS)}; {BASELINE} is added by --baseline, right after vhdxfs)")
    ap.add_argument("--baseline", metavar="DIR",
                    help=f"a checkout of vhdxfs (e.g. a git worktree of the commit before a change): adds "
                         f"contender {BASELINE}, the vhdxfs contender run from DIR's code, and the column "
                         f"vhdxfs/{BASELINE}. A/B: --contenders vhdxfs,{BASELINE} --baseline DIR --rounds N "
                         f"visits A B B A A B B A ...")
    ap.add_argument("--jobs", metavar="NAME,NAME",
                    help="run only the jobs whose name contains one of these (case-insensitive), e.g. "
                         "'rand read 4k' (both 4k read jobs) or 'fsync'")
    ap.add_argument("--no-footprint", action="store_true", help="skip the 64 TiB RSS and open-time figures")
    ap.add_argument("--workdir", default="/var/tmp", help="where the images go (default /var/tmp)")
    ap.add_argument("--results", default=str(HERE / "results"), help="where the JSON and Markdown go")
    args = ap.parse_args()
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if bad := set(args.contenders) - set(CONTENDERS + OPTIONAL + (BASELINE,)):
        ap.error(f"unknown contender(s): {', '.join(sorted(bad))}")
    if len(set(args.contenders)) != len(args.contenders):
        ap.error("a contender is named twice")
    if args.baseline:
        args.baseline = Path(args.baseline).resolve()
        if not (args.baseline / "vhdxfs" / "cli.py").is_file():
            ap.error(f"--baseline {args.baseline}: no vhdxfs/cli.py there (a checkout of this repository?)")
        if args.baseline == REPO:
            ap.error("--baseline is this checkout itself")
        if BASELINE not in args.contenders:
            at = args.contenders.index("vhdxfs") + 1 if "vhdxfs" in args.contenders else len(args.contenders)
            args.contenders.insert(at, BASELINE)
    elif BASELINE in args.contenders:
        ap.error(f"contender {BASELINE} needs --baseline DIR")
    if args.jobs:
        args.jobs = [p.strip() for p in args.jobs.split(",") if p.strip()]
        names = [j["name"] for j in jobs(False, 8 * GiB)]
        if unmatched := [p for p in args.jobs if not select([{"name": n} for n in names], [p])]:
            ap.error(f"--jobs: no job matches {', '.join(map(repr, unmatched))}; the jobs: {'; '.join(names)}")
    parse_size(args.size)  # reject nonsense before any work

    # SIGTERM (and SIGHUP, SIGINT unless started with them ignored, as by nohup or a shell's `&`) unwinds
    # through every clean-up like Ctrl-C does.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, on_signal)
    work = Path(tempfile.mkdtemp(prefix="vhdxfs-bench-", dir=args.workdir))
    bench = Bench(args, work)
    extra: dict = {}
    try:
        bench.prepare()
        log(f"image {args.size}, spans {bench.span // MiB} MiB, work dir {work}, "
            f"{len(bench.jobs)} of {len(bench.all_jobs)} jobs")
        bench.contend()
        if not args.no_footprint:
            extra = bench.footprint()
    except (KeyboardInterrupt, Interrupted) as exc:
        log(f"interrupted ({exc}); cleaning up, no report")
        return 130
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        for proc in CHILDREN:
            stop(proc, timeout=30)
        # Anything still mounted below the work dir (a contender that could not unmount) goes lazily,
        # so nothing stale stays behind and rmtree never walks into a FUSE mount.
        for point in mounts_under(work):
            log(f"stale mount {point}: unmounting")
            force_unmount(point)
        shutil.rmtree(work, ignore_errors=True)
    text = report(bench, extra, time.monotonic() - T0)
    print(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # results: contender -> job -> one sample per visit, each with its visit number (the order is in args).
    record = {"when": stamp, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "image_bytes": bench.size, "machine": machine(args.workdir), "versions": versions(args.baseline),
              "jobs": bench.jobs, "results": bench.results, "errors": bench.errors, "footprint": extra,
              "elapsed_s": time.monotonic() - T0}
    if BASELINE in args.contenders:
        record["comparison"] = comparison(bench)  # vhdxfs vs vhdxfs-base: per-visit figures and ratio
    save_results(args.results, stamp, record, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
