"""A real systemd as PID 1 for the unit tests: a Debian container booted with systemd-nspawn.

The host need not run systemd (``--keep-unit --register=no``: no machined, no scope unit of its own). The
container's root file system is a minimal debootstrap (systemd, fuse3 and the libraries the interpreter's
modules load), built once and cached outside the repository, keyed by what goes into it:

    python -m tests.fuse.nspawn build     (build the cached root file system now, say how long it took)

Every boot starts from that root untouched (``--volatile=overlay``: whatever the container writes lives in
a tmpfs and is gone at power-off). The project and its interpreter are bound in read-only at the paths they
have on the host, so the unit files' ExecStart= runs this checkout's code; a directory of the test's is
bound at /srv/test, read-write. Commands run inside through nsenter(1).

Two settings let the container's systemd enforce DevicePolicy=/DeviceAllow= as on a host: the cgroup v2
hierarchy alone (SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1; on a host with v1 controllers nspawn would give it
their hierarchies read-only, and systemd would set no device rules at all), and the bpf() system call
(--system-call-filter=bpf: nspawn's own filter refuses it, and on cgroup v2 device rules are BPF programs).
Without them DevicePolicy=closed lets every device through, silently.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("VHDXFS_NSPAWN_CACHE", "/var/cache/vhdxfs-tests"))
MIRROR = os.environ.get("VHDXFS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
LAYOUT = 1  # raise when the steps after debootstrap change, so a cached root built the old way is not used
# What the units and the daemon need: systemd as init, fusermount3 and libfuse3 (pyfuse3 links it),
# findmnt (util-linux: ExecStopPost=), and the shared libraries the interpreter's own modules load
# (ctypes: libffi; ssl and hashlib: libssl; pyexpat). minbase brings libc, zlib, liblzma, libbz2, libuuid.
PACKAGES = ["systemd", "systemd-sysv", "fuse3", "util-linux", "libffi8", "libssl3", "libexpat1"]
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
       "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}


class Unavailable(Exception):
    """The machine cannot run the container (the reason is the message)."""


def codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.partition("=")[2].strip('"')
    raise Unavailable("/etc/os-release names no VERSION_CODENAME: not a Debian host")


def interpreter_home() -> Path | None:
    """Where the interpreter lives when it is not the system's own (/usr): bound in read-only. For the
    system's, the root file system gets Debian's python3, the same version since the suite is the host's."""
    base = Path(sys.base_prefix)
    return None if base == Path("/usr") else base


def packages() -> list[str]:
    return PACKAGES + (["python3"] if interpreter_home() is None else [])


def rootfs_path() -> Path:
    key = hashlib.sha256(json.dumps([LAYOUT, codename(), MIRROR, packages()]).encode()).hexdigest()[:12]
    return CACHE / f"rootfs-{codename()}-{key}"


def build_rootfs(log: Path | None = None) -> tuple[Path, float]:
    """The cached root file system, built first if need be; and the seconds building took (0 if cached).
    Built into a temporary directory and renamed when complete, under a lock: a build that was cut short
    is never used, and two test runs never build at once."""
    root = rootfs_path()
    if (root / ".complete").exists():
        return root, 0.0
    for tool in ("debootstrap", "systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} is not installed (./setup.sh installs it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / ".complete").exists():
            return root, 0.0
        started = time.monotonic()
        work = root.with_name(root.name + ".building")
        shutil.rmtree(work, ignore_errors=True)
        log = log or CACHE / f"{root.name}.log"
        with open(log, "wb") as out:
            result = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(packages())}",
                                     codename(), str(work), MIRROR], stdout=out, stderr=subprocess.STDOUT,
                                    timeout=1800)
        if result.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            shutil.rmtree(work, ignore_errors=True)
            raise Unavailable(f"debootstrap failed ({log}): {' | '.join(tail)}")
        _finish(work)
        (work / ".complete").write_text(f"built in {time.monotonic() - started:.0f} s\n")
        shutil.rmtree(root, ignore_errors=True)
        work.rename(root)
        return root, time.monotonic() - started


def _finish(root: Path) -> None:
    """After debootstrap: no getty on the console (it is a pipe), no downloaded packages kept."""
    for unit in ("console-getty.service", "getty@.service", "systemd-networkd-wait-online.service"):
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (root / "etc/vhdxfs").mkdir(exist_ok=True)


class Container:
    """A booted container; ``run`` runs a command inside. Use ``boot`` (a context manager)."""

    def __init__(self, process: subprocess.Popen[bytes], leader: int, console: Path) -> None:
        self.process = process
        self.leader = leader
        self.console = console

    def run(self, *args: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "-r", "-w", *args], env=ENV,
                                capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"in the container: {' '.join(args)}: exit {result.returncode}\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def path(self, inside: str) -> Path:
        """A path of the container's, as the host reaches it (a unix socket, say)."""
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def journal(self, *matches: str, after: str | None = None) -> list[dict[str, object]]:
        """Journal entries (journalctl -o json) matching ``matches``, after the cursor ``after``."""
        args = ["journalctl", "--no-pager", "-o", "json", *matches]
        if after:
            args.append(f"--after-cursor={after}")
        out = self.run(*args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def cursor(self) -> str:
        """Where the journal ends now."""
        entries = self.journal("-n", "1")
        return str(entries[-1]["__CURSOR"]) if entries else ""


def _find_leader(token: str) -> int | None:
    """The container's PID 1 as the host numbers it: the process given our token by --setenv= that is
    pid 1 of its own pid namespace."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"VHDXFS_NSPAWN_TOKEN={token}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            status = (entry / "status").read_text()
        except OSError:
            continue
        nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
        if nspid and nspid[-1] == "1":
            return int(entry.name)
    return None


@contextlib.contextmanager
def boot(root: Path, binds: Sequence[str], console: Path, ready_timeout: float = 180) -> Iterator[Container]:
    """Boot ``root`` (``binds``: more --bind=/--bind-ro= options); yield once systemd says the system is up
    (running or degraded); power off at the end, killing the container if it will not stop."""
    token = uuid.uuid4().hex
    home = interpreter_home()
    command = ["systemd-nspawn", "--boot", f"--directory={root}", "--register=no", "--keep-unit",
               "--volatile=overlay", "--bind=/dev/fuse", "--capability=all", "--system-call-filter=bpf",
               "--console=pipe",
               f"--machine=vhdxfs-test-{token[:8]}", f"--setenv=VHDXFS_NSPAWN_TOKEN={token}",
               f"--bind-ro={REPO}", *([f"--bind-ro={home}"] if home else []), *binds]
    with open(console, "wb") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1"))
    try:
        deadline = time.monotonic() + ready_timeout
        leader = None
        while leader is None and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            leader = _find_leader(token)
        if leader is None:
            raise Unavailable(f"the container did not start: {_tail(console)}")
        container = Container(process, leader, console)
        state = ""
        while process.poll() is None and time.monotonic() < deadline:
            # Until systemd listens on its private socket, systemctl fails at once, saying nothing on stdout.
            answer = container.run("systemctl", "is-system-running", "--wait", check=False,
                                   timeout=max(1.0, deadline - time.monotonic()))
            state = answer.stdout.strip() or answer.stderr.strip()
            if answer.stdout.strip():
                break
            time.sleep(0.2)
        if state not in ("running", "degraded"):
            raise Unavailable(f"systemd in the container did not come up ({state!r}): {_tail(console)}")
        yield container
    finally:
        # SIGTERM: nspawn asks the container's systemd to power off (SIGRTMIN+3); a second one would not wait.
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=60)


def _tail(console: Path) -> str:
    lines = console.read_text(errors="replace").strip().splitlines()
    return " | ".join(lines[-5:]) or "(no output)"


def main() -> int:
    if sys.argv[1:] != ["build"]:
        print(__doc__)
        return 2
    root, seconds = build_rootfs()
    size = subprocess.run(["du", "-sh", str(root)], capture_output=True, text=True).stdout.split()[0]
    print(f"{root}: {f'built in {seconds:.0f} s' if seconds else 'cached'}; {size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
