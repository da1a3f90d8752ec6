"""--baseline DIR (both front ends) and --vhdxfs-src DIR (NBD): vhdxfs run from the code of another checkout.

An A/B of two versions in one session is the only comparison this noisy machine allows (the same job moves
by 1.5x between phases of the VM), so the harness runs the old code beside the new one as one more
contender, vhdxfs-base, visited right after vhdxfs, and reports the ratio of their medians.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from .procs import PYTHON, Unavailable, run, vhdxfs_bin

BASELINE = "vhdxfs-base"  # the contender --baseline DIR adds


class Baseline:
    """How to run the vhdxfs of another checkout: `PYTHON -m vhdxfs.cli ...` with DIR first on sys.path.

    Why the daemon runs DIR's code and not this repo's (the editable install in the venv):
    - `vhdxfs mount` and `vhdxfs serve` daemonize by os.fork() without exec (vhdxfs/service/daemon.py), so
      the daemon is the very process we start here: the modules it imported, and any it imports later,
      come from its sys.path.
    - That sys.path starts with PYTHONPATH=DIR. PYTHONSAFEPATH=1 keeps `python -m` from putting the working
      directory in front of it (started from /work/main, that would win and load this repo's vhdxfs/), and
      we start it in DIR anyway. The editable install is a meta-path finder that setuptools *appends* after
      the regular path finder: it only answers for names that sys.path cannot find, and DIR/vhdxfs is found.
    - Checked, not assumed: check() imports vhdxfs.cli (and every subcommand's module) with the same
      interpreter, environment and directory and refuses unless every vhdxfs module comes from DIR; and
      after each start, daemon() finds the daemon by its mount point or socket and checks its
      /proc/<pid>/environ.
    """

    def __init__(self, src: Path) -> None:
        self.src = src
        self.cmd: list[str] = [str(PYTHON), "-m", "vhdxfs.cli"]
        self.env = {"PYTHONPATH": str(src), "PYTHONSAFEPATH": "1"}  # added to os.environ
        self.checked = False

    PROBE = ("import sys, vhdxfs.cli as cli\n"
             "getattr(cli, 'build_parser', lambda: None)()  # imports every subcommand's module\n"
             "print('\\n'.join(sorted({getattr(m, '__file__', None) or '?' for n, m in list(sys.modules.items())\n"
             "                          if n.split('.')[0] == 'vhdxfs'})))")

    def environ(self) -> dict[str, str]:
        return dict(os.environ, **self.env)

    def check(self) -> None:
        if self.checked:
            return
        files = run(PYTHON, "-c", self.PROBE, env=self.environ(), cwd=self.src, timeout=60).stdout.split()
        stray = [f for f in files if not Path(f).resolve().is_relative_to(self.src)]
        if not files or stray:
            raise Unavailable(f"vhdxfs of {self.src} would load {stray[0] if stray else 'nothing'}")
        self.checked = True

    def daemon(self, where: Path) -> int:
        """The pid of the daemon serving where (a mount point or a socket), started with PYTHONPATH=DIR."""
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if proc.name.isdigit() and str(where).encode() in (proc / "cmdline").read_bytes().split(b"\0"):
                    if f"PYTHONPATH={self.src}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                        return int(proc.name)
        raise Unavailable(f"no daemon started with PYTHONPATH={self.src} serves {where}")


def vhdxfs_cmd(base: Baseline | None) -> tuple[list[str], dict[str, Any]]:
    """How to run vhdxfs: this repo's command, or the code of another checkout (checked first).

    Returns the command and the keywords for procs.run (environment, working directory)."""
    if base is None:
        return [str(vhdxfs_bin())], {}
    base.check()  # every vhdxfs module would come from DIR
    return list(base.cmd), {"env": base.environ(), "cwd": base.src}


def checkout(path: str, itself: Path | None = None) -> Path | str:
    """DIR of --baseline / --vhdxfs-src, resolved; or why it cannot be one (a message for argparse).
    itself: this checkout, refused (a baseline that is the code under test measures nothing)."""
    src = Path(path).resolve()
    if not (src / "vhdxfs" / "cli.py").is_file():
        return f"{src}: no vhdxfs/cli.py there (a checkout of this repository?)"
    if src == itself:
        return f"{src} is this checkout itself"
    return src
