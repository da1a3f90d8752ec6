"""Pid records: where a daemon says "I serve this", so a stop command can find it and wait for its exit.

A record holds pid, key (the mount point or listen address) and the process start time (clock ticks since
boot), one per line. The start time tells a live daemon from an unrelated process that inherited a dead
daemon's pid.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path


def _default_state_dir() -> Path:
    """/run/vhdxfs for root; a user's own runtime directory otherwise (they cannot write /run)."""
    if os.geteuid() == 0:
        return Path("/run/vhdxfs")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "vhdxfs" if runtime else Path(tempfile.gettempdir()) / f"vhdxfs-{os.geteuid()}"


STATE_DIR = Path(os.environ["VHDXFS_STATE_DIR"]) if os.environ.get("VHDXFS_STATE_DIR") else _default_state_dir()


def record_path(key: str, suffix: str = ".pid") -> Path:
    return STATE_DIR / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}{suffix}"


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, or None when there is no such process or it has exited (a zombie
    waiting for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def write_record(path: Path, key: str) -> None:
    """Atomically, so a stop command never reads half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n{key}\n{process_start_time(os.getpid())}\n")
    tmp.replace(path)


def read_record(path: Path, key: str) -> int | None:
    """The pid of the live daemon that recorded ``key`` in ``path``, if the record is there and still true."""
    try:
        fields = path.read_text().split("\n")
        pid, recorded, started = int(fields[0]), fields[1], fields[2]
    except (OSError, ValueError, IndexError):
        return None
    now = process_start_time(pid)
    if now is None or recorded != key or str(now) != started:
        return None
    return pid


def remove_record(path: Path, key: str) -> None:
    """Remove this process's record of ``key``; a record another daemon has written since (a new mount on
    the directory a lazily unmounted daemon leaves) is theirs and stays."""
    if read_record(path, key) == os.getpid():
        path.unlink(missing_ok=True)


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (a zombie counts: it has closed everything); False on time-out."""
    deadline = time.monotonic() + timeout
    while process_start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
