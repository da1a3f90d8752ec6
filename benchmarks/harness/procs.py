"""Processes and mounts for every harness: whatever a benchmark starts is stopped again, whatever happens.

A benchmark that dies half-way must not leave a daemon serving a deleted image, a FUSE mount over the work
directory or fio's job processes holding a file open: the next run (or the machine's other work) would pay
for them. So every command runs in its own process group, daemons we start in the foreground are recorded
in CHILDREN, and a signal unwinds through every clean-up as Ctrl-C does (Interrupted).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parents[1]  # benchmarks/
REPO = HERE.parent
VENV = REPO / ".venv" / "bin"
PYTHON = VENV / "python" if (VENV / "python").exists() else Path(sys.executable)
MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
T0 = time.monotonic()


class Unavailable(Exception):
    """A contender (or a measurement) that cannot run here; the message is the reason shown as n/a."""


class Interrupted(BaseException):
    """A signal (SIGTERM, SIGHUP, SIGINT): unwinds through every clean-up."""


def on_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def reason(exc: BaseException) -> str:
    """What to print for a failure: our own messages as they are, anything else with its type."""
    return str(exc) if isinstance(exc, Unavailable) else f"{type(exc).__name__}: {exc}"


def log(msg: str) -> None:
    """Progress on stderr with the seconds since start: stdout is kept for the report."""
    print(f"[{time.monotonic() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """'8G', '256MiB', '4096': bytes (checked before any work, so a typo does not cost an image)."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": TiB}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def run(*args: object, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise Unavailable with the last lines it printed.

    The command gets its own process group, and the whole group is killed if we are interrupted or it
    times out: fio's job processes must not live on holding a mounted file open.
    """
    argv = [str(a) for a in args]
    label = " ".join(argv[2:4] if argv[1:2] == ["-m"] else [Path(argv[0]).name, *argv[1:2]])  # python -m mod cmd
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


# -- daemons in the foreground: stopped at the latest when the harness exits --------------------------------
CHILDREN: list[subprocess.Popen[bytes]] = []


def spawn(args: list[Any], log_path: Path, **kw: Any) -> subprocess.Popen[bytes]:
    """Start a daemon in the foreground, its output in log_path (read back to say why it failed)."""
    with log_path.open("w") as out:
        proc = subprocess.Popen([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT, **kw)
    CHILDREN.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM (the FUSE daemons flush and unmount on it, the NBD servers close), SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- mounts ---------------------------------------------------------------------------------------------------
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


def is_mounted(path: Path) -> bool:
    return str(path) in mounts_under(path)

