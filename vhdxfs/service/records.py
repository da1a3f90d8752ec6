"""Pid records: where a daemon says "I serve this", so a stop command can find it and wait for its exit, and
a command can find the daemon that holds an image.

A record holds pid, key (the mount point or listen address) and the process start time (clock ticks since
boot), one per line. The start time tells a live daemon from an unrelated process that inherited a dead
daemon's pid. A fourth line, one JSON object, says what the daemon holds (readers of the first three lines
never look at it, so old and new records read alike):

    {"kind": "mount", "control": "/run/vhdxfs/<hash>.ctl",
     "images": [{"name": "disk.raw", "image": "/srv/vm/disk.vhdx", "read-only": false,
                 "layers": ["/srv/vm/disk_<GUID>.avhdx", "/srv/vm/disk.vhdx"]}]}

``layers`` is every file of the image's chain, top first; the daemon rewrites its record after each live
operation (a checkpoint adds a layer, a merge removes one). ``holders_of`` reads the records of every state
directory (root's and each user's) to name the daemon that holds an image.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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


def write_record(path: Path, key: str, holds: dict[str, Any] | None = None) -> None:
    """Atomically, so a stop command never reads half a record; ``holds`` is the fourth line (kind, control
    socket, images and their layers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    extra = json.dumps(holds, separators=(",", ":"), default=str) + "\n" if holds is not None else ""
    tmp.write_text(f"{os.getpid()}\n{key}\n{process_start_time(os.getpid())}\n{extra}")
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


@dataclass(frozen=True)
class Holder:
    """A live daemon, as its record describes it."""

    pid: int
    kind: str  # mount | nbd
    key: str  # its mount point, or its listen address (unix:PATH, tcp:HOST:PORT)
    record: Path
    control: Path | None = None  # its control socket
    images: list[dict[str, Any]] = field(default_factory=list)  # name, image, read-only, layers (top first)

    def holds(self, image: str | os.PathLike[str]) -> dict[str, Any] | None:
        """The served image whose chain has ``image`` in it (as a layer, or as the image configured)."""
        wanted = os.path.realpath(image)
        for served in self.images:
            files = [served.get("image"), *served.get("layers", [])]
            if any(isinstance(f, str) and os.path.realpath(f) == wanted for f in files):
                return served
        return None

    def describe(self) -> str:
        """"the vhdxfs mount daemon 1234 at /mnt/vm", "the vhdxfs NBD server 99 on unix:/run/x.sock"."""
        if self.kind == "mount":
            return f"the vhdxfs mount daemon {self.pid} at {self.key}"
        return f"the vhdxfs NBD server {self.pid} on {self.key}"

    def stop_hint(self) -> str:
        if self.kind == "mount":
            return f"vhdxfs umount {self.key}"
        if self.key.startswith("tcp:"):
            host, _, port = self.key[4:].rpartition(":")
            return f"vhdxfs stop {f'[{host}]' if ':' in host else host}:{port}"
        return f"vhdxfs stop {self.key.removeprefix('unix:')}"


def state_dirs() -> list[Path]:
    """Where daemons record themselves: ours, root's, and every user's runtime directory we may read."""
    found = [STATE_DIR, Path("/run/vhdxfs"), *map(Path, sorted(glob.glob("/run/user/*/vhdxfs"))),
             *map(Path, sorted(glob.glob(os.path.join(tempfile.gettempdir(), "vhdxfs-*"))))]
    return [d for d in dict.fromkeys(found) if d.is_dir()]


def read_holder(path: Path) -> Holder | None:
    """The live daemon ``path`` records, with what it holds (nothing known from a record of three lines)."""
    try:
        fields = path.read_text().split("\n")
        pid, key = int(fields[0]), fields[1]
    except (OSError, ValueError, IndexError):
        return None
    if read_record(path, key) != pid:
        return None
    try:
        holds = json.loads(fields[3]) if len(fields) > 3 and fields[3] else {}
    except ValueError:
        holds = {}
    holds = holds if isinstance(holds, dict) else {}
    kind = holds.get("kind") or ("nbd" if path.name.endswith(".nbd.pid") else "mount")
    control = holds.get("control")
    images = holds.get("images")
    return Holder(pid, str(kind), key, path, Path(control) if isinstance(control, str) else None,
                  [i for i in images if isinstance(i, dict)] if isinstance(images, list) else [])


def daemons() -> list[Holder]:
    """Every live daemon the state directories record."""
    out = []
    for folder in state_dirs():
        for path in sorted(folder.glob("*.pid")):
            holder = read_holder(path)
            if holder is not None:
                out.append(holder)
    return out


def holders_of(image: str | os.PathLike[str]) -> list[tuple[int, str, str]]:
    """(pid, kind, key) of every live daemon whose chains hold ``image``."""
    return [(h.pid, h.kind, h.key) for h in daemons() if h.holds(image) is not None]


def held_message(image: str | os.PathLike[str]) -> str | None:
    """"in use by the vhdxfs mount daemon 1234 at /mnt/vm; stop it first (vhdxfs umount /mnt/vm)", or None
    when no other daemon's record holds ``image`` (a daemon refused by another, as a live merge is by a
    backup reading its checkpoint, names the other). Never raises: it only words an error."""
    try:
        holders = [h for h in daemons() if h.holds(image) is not None and h.pid != os.getpid()]
    except Exception:  # noqa: BLE001 - a message is being worded; the error it words is what counts
        return None
    if not holders:
        return None
    names = " and ".join(h.describe() for h in holders)
    hints = "; ".join(h.stop_hint() for h in holders)
    return f"in use by {names}; stop it first ({hints})"
