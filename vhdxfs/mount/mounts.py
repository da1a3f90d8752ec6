"""What is mounted where, read from /proc/self/mountinfo rather than by stat(2).

Why not ``os.path.ismount``: on a FUSE mount whose daemon died, every stat fails with ENOTCONN, so
ismount says "not mounted" and is_dir says "no such directory", and both the mount command and the umount
command would give the user a wrong answer about the one situation they most need help with.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
FSTYPE = "fuse.vhdxfs"
# A FUSE connection that is gone: ENOTCONN, or ECONNABORTED on kernels that tell an aborted one apart.
DEAD_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def normalize(path: str | os.PathLike[str]) -> str:
    """Absolute path with symlinks resolved as far as they resolve (a dead mount point does not)."""
    return os.path.realpath(os.path.abspath(path))


def find_mount(path: str | os.PathLike[str], mountinfo: str = MOUNTINFO) -> MountEntry | None:
    """The topmost mount whose mount point is ``path``, or None when nothing is mounted exactly there."""
    target = normalize(path)
    found = None
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        before, sep, after = line.partition(" - ")
        fields = before.split(" ")
        rest = after.split(" ")
        if not sep or len(fields) < 5 or len(rest) < 2:
            continue
        if _unescape(fields[4]) == target:
            found = MountEntry(target, rest[0], _unescape(rest[1]))  # later lines are mounted on top
    return found


def is_dead(path: str | os.PathLike[str]) -> bool:
    """True for a FUSE mount whose daemon is gone ("Transport endpoint is not connected").

    statvfs, not stat: the kernel answers stat from its attribute cache without asking the daemon, but
    every statfs is a request, so only statfs reliably meets the dead connection.
    """
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno in DEAD_ERRNOS
    return False
