"""The NBD contenders: context managers yielding a running server on a unix socket; each is stopped again.

vhdxfs daemonizes (`vhdxfs serve`, stopped with `vhdxfs stop SOCK`), so it is not our child: its socket is
recorded in SERVING until stopped, and the harness stops whatever is left there on exit. qemu-nbd and nbdkit
run in the foreground as our children (procs.CHILDREN) and are stopped by SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .baseline import Baseline, vhdxfs_cmd
from .jobs import nbd_uri
from .procs import CHILDREN, HERE, PYTHON, Unavailable, log, run, spawn, stop, wait_for

PLUGIN = HERE / "nbd" / "nbdkit_vhdx.py"


@dataclass
class Server:
    name: str
    sock: Path
    pid: int
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)  # the variables added to the environment, for the report
    proc: subprocess.Popen[bytes] | None = None  # when it is our child
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


SERVING: list[tuple[Path, Baseline | None]] = []  # vhdxfs daemons (socket, whose code): stopped on exit


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
    got = run("nbdinfo", "--size", nbd_uri(srv.sock), timeout=60).stdout.strip()
    if got != str(size):
        raise Unavailable(f"{srv.name} exports {got} bytes, not {size}")


def stop_vhdxfs(sock: Path, pid: int | None, base: Baseline | None = None) -> None:
    """`vhdxfs stop SOCK` with the code that started it; SIGTERM, then SIGKILL to the daemon if that fails."""
    try:
        cmd, how = vhdxfs_cmd(base)
        run(*cmd, "stop", sock, timeout=300, **how)
    except Unavailable as exc:
        log(f"vhdxfs stop: {exc}")
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                for _ in range(200):
                    os.kill(pid, 0)
                    time.sleep(0.05)
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ValueError):
        SERVING.remove((sock, base))


@contextlib.contextmanager
def vhdxfs_server(name: str, image: Path, sock: Path, size: int, base: Baseline | None = None) -> Iterator[Server]:
    """`vhdxfs serve` of this repo, or with base of another checkout (then checked: the daemon found by its
    socket must have been started with PYTHONPATH=DIR)."""
    cmd, how = vhdxfs_cmd(base)
    cmd = [*cmd, "serve", "--socket", str(sock), str(image)]
    run(*cmd, timeout=120, **how)  # returns once the daemon listens
    SERVING.append((sock, base))
    pid = None
    try:
        pid = base.daemon(sock) if base else serve_pid(sock)
        srv = Server(name, sock, pid, cmd, dict(base.env) if base else {})
        check_size(srv, size)
        yield srv
    finally:
        stop_vhdxfs(sock, pid, base)


def stop_all_vhdxfs() -> None:
    """On exit: every vhdxfs daemon still serving, with the code that started it."""
    for sock, base in list(SERVING):
        stop_vhdxfs(sock, None, base)


@contextlib.contextmanager
def child_server(name: str, cmd: list[str], sock: Path, work: Path, size: int,
                 env: dict[str, str] | None = None) -> Iterator[Server]:
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


def qemu_nbd_cmd(image: Path, sock: Path) -> list[str]:
    """-t: persistent (it would exit after its first client); -e 8: the default --shared=1 refuses fio's
    second connection."""
    return ["qemu-nbd", "-f", "vhdx", "-t", "-e", "8", f"--socket={sock}", str(image)]


def nbdkit_cmd(image: Path, sock: Path) -> list[str]:
    return ["nbdkit", "-f", "--unix", str(sock), "python", str(PLUGIN), f"image={image}"]


def venv_site_packages() -> str:
    """For nbdkit's embedded Debian python: where the venv's dependencies of vhdxfs are."""
    return run(PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()


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
