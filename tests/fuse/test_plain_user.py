"""`vhdxfs mount` as a user other than root: a fresh unprivileged user mounts, writes and unmounts, and each
of the usual obstacles (/dev/fuse closed to them, -o allow_other without user_allow_other, a mount point
that is not theirs, an image they may only read) is refused before anything is mounted, in one line that
names the file and what to do.

The test user runs this very interpreter and source tree, so whatever lies on the way to them and is closed
to other users (/root, mode 0700, where pyenv keeps Python) is made traversable for the module's duration;
/dev/fuse and /etc/fuse.conf are set as each test needs. Every mode and file changed is restored, and the
user deleted, in the fixtures' teardown, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import vhdxfs as vhdxfs_package
from tests.helpers import missing, need_root_fuse, need_tools
from vhdxfs.mount import command
from vhdxfs.mount.daemon import MountConfig
from vhdxfs.mount.mounts import find_mount

MiB = 1 << 20
REPO = Path(vhdxfs_package.__file__).resolve().parents[1]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@contextlib.contextmanager
def mode_changed(path: str | os.PathLike, mode: int):
    """``path`` has ``mode`` inside the block, and its old mode again after it."""
    old = stat.S_IMODE(os.stat(path).st_mode)
    os.chmod(path, mode)
    try:
        yield
    finally:
        os.chmod(path, old)


@contextlib.contextmanager
def fuse_conf(allow_other: bool):
    """/etc/fuse.conf with (or without) user_allow_other, as fusermount3 reads it; the real one back after."""
    conf = Path(command.FUSE_CONF)
    try:
        saved, st = conf.read_bytes(), conf.stat()
    except FileNotFoundError:
        saved, st = None, None
    lines = [line for line in (saved or b"").splitlines() if line.split(b"#", 1)[0].strip() != b"user_allow_other"]
    if allow_other:
        lines.append(b"user_allow_other")
    try:
        conf.write_bytes(b"".join(line + b"\n" for line in lines))  # in place: owner and mode stay
        if st is None:
            os.chmod(conf, 0o644)
        yield
    finally:
        if saved is None:
            conf.unlink(missing_ok=True)
        else:
            conf.write_bytes(saved)
            os.utime(conf, ns=(st.st_atime_ns, st.st_mtime_ns))


def closed_ancestors(paths: list[Path]) -> list[Path]:
    """Directories on the way to ``paths`` (as given and with symlinks resolved) that other users cannot
    traverse."""
    found: dict[Path, None] = {}
    for path in paths:
        for p in (Path(os.path.abspath(path)), path.resolve()):
            for d in reversed(p.parents):
                if not os.stat(d).st_mode & stat.S_IXOTH:
                    found[d] = None
    return list(found)


def unreadable_files(*roots: Path, limit: int = 5) -> list[str]:
    bad = []
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                p = os.path.join(dirpath, name)
                if not os.stat(p, follow_symlinks=False).st_mode & stat.S_IROTH:
                    bad.append(p)
                    if len(bad) >= limit:
                        return bad
    return bad


class PlainUser:
    """A fresh user with a home in the temporary directory, running commands with a clean environment."""

    def __init__(self, name: str, home: Path) -> None:
        self.name = name
        self.uid = pwd.getpwnam(name).pw_uid
        self.gid = pwd.getpwnam(name).pw_gid
        self.home = home

    def run(self, *args, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
        env = [f"PATH={SYSTEM_PATH}", f"HOME={self.home}", f"USER={self.name}", f"LOGNAME={self.name}",
               f"XDG_RUNTIME_DIR={cwd / 'run'}", f"PYTHONPATH={REPO}", "LANG=C.UTF-8"]
        return subprocess.run(["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--",
                               "env", "-i", *env, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)

    def vhdxfs(self, *args, cwd: Path) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "vhdxfs.cli", *args, cwd=cwd)

    def workdir(self, name: str) -> Path:
        """A directory of the user's own, with a runtime directory (XDG_RUNTIME_DIR) of its own in it."""
        d = self.home / name
        d.mkdir()
        (d / "run").mkdir(mode=0o700)
        for p in (d, d / "run"):
            os.chown(p, self.uid, self.gid)
        return d

    def processes(self) -> list[int]:
        out = subprocess.run(["pgrep", "-U", str(self.uid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]


def _cleanup_user(user: PlainUser) -> None:
    """Leave nothing of the user: their mounts (which root may remove), their processes (all started by
    these tests: the user is new), their account and home. A daemon that has exited may linger as a zombie
    until init reaps it, and userdel refuses a user who still has one: so wait for them all to go."""
    for entry in Path("/proc/self/mountinfo").read_text().splitlines():
        point = entry.split(" ")[4]
        if point.startswith(f"{user.home}/"):
            subprocess.run(["fusermount3", "-uz", point], capture_output=True)
    start = time.monotonic()
    signalled: set[tuple[int, int]] = set()
    while (pids := user.processes()) and time.monotonic() < start + 20:
        sig = signal.SIGTERM if time.monotonic() < start + 5 else signal.SIGKILL
        for pid in pids:
            if (pid, sig) not in signalled:
                signalled.add((pid, sig))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        time.sleep(0.05)
    result = subprocess.run(["userdel", "-r", user.name], capture_output=True, text=True)
    shutil.rmtree(user.home, ignore_errors=True)
    with contextlib.suppress(KeyError):
        pwd.getpwnam(user.name)
        raise AssertionError(f"could not delete test user {user.name}: {result.stderr.strip()}")


@pytest.fixture(scope="module")
def plain_user():
    need_root_fuse()
    need_tools("useradd", "userdel", "setpriv", "pgrep", "dd")
    with open("/proc/self/status") as f:
        if any(line.split() == ["NoNewPrivs:", "1"] for line in f):
            missing("no_new_privs is set: the setuid fusermount3 cannot work for a plain user here")
    name = f"vhdxfs-t{secrets.token_hex(4)}"
    home = Path(tempfile.gettempdir()).resolve() / name
    with contextlib.ExitStack() as undo:
        result = subprocess.run(["useradd", "--create-home", "--home-dir", str(home), "--shell", "/usr/sbin/nologin",
                                 "--user-group", name], capture_output=True, text=True)
        if result.returncode != 0:
            missing(f"useradd {name} failed: {result.stderr.strip()}")
        user = PlainUser(name, home)
        undo.callback(_cleanup_user, user)
        os.chmod(home, 0o755)
        needed = [Path(sys.executable), Path(sys.prefix), Path(sys.base_prefix), REPO / "vhdxfs", home]
        for d in closed_ancestors(needed):
            undo.enter_context(mode_changed(d, stat.S_IMODE(os.stat(d).st_mode) | 0o011))
        probe = user.run(sys.executable, "-c", "import pyfuse3, trio, vhdxfs.cli, vhdxfs.mount.command",
                         cwd=home)
        if probe.returncode != 0:
            unreadable = unreadable_files(REPO / "vhdxfs", Path(sys.prefix))
            missing(f"user {name} cannot run {sys.executable} with {REPO}: {probe.stderr.strip()[-300:]}; "
                    f"files not readable by others: {unreadable}")
        yield user


@pytest.fixture
def dev_fuse():
    """Set /dev/fuse's mode for a test; its own mode comes back after."""
    with contextlib.ExitStack() as stack:
        yield lambda mode: stack.enter_context(mode_changed("/dev/fuse", mode))


def refused(result: subprocess.CompletedProcess, work: Path, path: str | os.PathLike, *words: str) -> str:
    """The mount failed in one line naming ``path`` and saying ``words``, before any daemon started."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"vhdxfs: {path}: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert not (work / "run" / "vhdxfs").exists(), "a daemon started: the check came too late"
    assert find_mount(work / "mnt") is None
    return lines[0]


def test_a_plain_user_mounts_writes_unmounts_and_the_image_is_clean(plain_user, dev_fuse):
    dev_fuse(0o666)
    work = plain_user.workdir("round-trip")
    data = os.urandom(2 * MiB)
    (work / "data").write_bytes(data)
    result = plain_user.vhdxfs("create", "--size", "32M", "disk.vhdx", cwd=work)
    assert result.returncode == 0, result.stderr
    assert plain_user.run("mkdir", "mnt", cwd=work).returncode == 0
    result = plain_user.vhdxfs("mount", "disk.vhdx", "mnt", cwd=work)
    assert result.returncode == 0, result.stderr
    assert find_mount(work / "mnt") is not None
    result = plain_user.run("dd", "if=data", "of=mnt/disk.raw", "bs=1M", "seek=5", "conv=notrunc,fsync",
                            "status=none", cwd=work)
    assert result.returncode == 0, result.stderr
    result = plain_user.run("cmp", "-n", str(len(data)), "data", "mnt/disk.raw", f"--ignore-initial=0:{5 * MiB}",
                            cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    result = plain_user.vhdxfs("umount", "mnt", cwd=work)
    assert result.returncode == 0, result.stderr
    assert find_mount(work / "mnt") is None
    result = plain_user.vhdxfs("check", "disk.vhdx", cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    with vhdxfs_package.open(work / "disk.vhdx") as disk:
        disk.seek(5 * MiB)
        assert disk.read(len(data)) == data
        assert disk.read(MiB) == bytes(MiB)


def test_dev_fuse_closed_to_the_user(plain_user, dev_fuse):
    dev_fuse(0o600)
    work = plain_user.workdir("dev-fuse")
    assert plain_user.vhdxfs("create", "--size", "8M", "disk.vhdx", cwd=work).returncode == 0
    assert plain_user.run("mkdir", "mnt", cwd=work).returncode == 0
    refused(plain_user.vhdxfs("mount", "disk.vhdx", "mnt", cwd=work), work, "/dev/fuse", "0666", "Debian",
            "group")


def test_allow_other_needs_user_allow_other_in_fuse_conf(plain_user, dev_fuse):
    dev_fuse(0o666)
    work = plain_user.workdir("allow-other")
    assert plain_user.vhdxfs("create", "--size", "8M", "disk.vhdx", cwd=work).returncode == 0
    assert plain_user.run("mkdir", "mnt", cwd=work).returncode == 0
    with fuse_conf(allow_other=False):
        refused(plain_user.vhdxfs("mount", "-o", "allow_other", "disk.vhdx", "mnt", cwd=work), work,
                command.FUSE_CONF, "-o allow_other", "user_allow_other")
    with fuse_conf(allow_other=True):  # and fusermount3 agrees that the line we look for is the one it needs
        result = plain_user.vhdxfs("mount", "-o", "allow_other", "disk.vhdx", "mnt", cwd=work)
        assert result.returncode == 0, result.stderr
        try:
            assert (work / "mnt" / "disk.raw").stat().st_size == 8 * MiB  # root is "other"
        finally:
            result = plain_user.vhdxfs("umount", "mnt", cwd=work)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("mode", [0o755, 0o1777], ids=["not-writable", "sticky"])
def test_a_mount_point_not_the_users(plain_user, dev_fuse, mode):
    dev_fuse(0o666)
    work = plain_user.workdir(f"mount-point-{mode:o}")
    assert plain_user.vhdxfs("create", "--size", "8M", "disk.vhdx", cwd=work).returncode == 0
    (work / "mnt").mkdir()
    os.chmod(work / "mnt", mode)  # root's
    refused(plain_user.vhdxfs("mount", "disk.vhdx", "mnt", cwd=work), work, work / "mnt", "not yours", "mkdir")


def test_an_image_the_user_may_only_read(plain_user, dev_fuse):
    dev_fuse(0o666)
    work = plain_user.workdir("read-only")
    assert plain_user.vhdxfs("create", "--size", "8M", "disk.vhdx", cwd=work).returncode == 0
    os.chown(work / "disk.vhdx", 0, 0)
    os.chmod(work / "disk.vhdx", 0o644)
    assert plain_user.run("mkdir", "mnt", cwd=work).returncode == 0
    refused(plain_user.vhdxfs("mount", "disk.vhdx", "mnt", cwd=work), work, work / "disk.vhdx", "-o ro")
    result = plain_user.vhdxfs("mount", "-o", "ro", "disk.vhdx", "mnt", cwd=work)  # and as it says, that works
    assert result.returncode == 0, result.stderr
    try:
        result = plain_user.run("dd", "if=mnt/disk.raw", "of=/dev/null", "bs=1M", "status=none", cwd=work)
        assert result.returncode == 0, result.stderr
    finally:
        result = plain_user.vhdxfs("umount", "mnt", cwd=work)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("conf", "allowed"), [
    (b"user_allow_other\n", True),
    (b"# comment\n  user_allow_other   # trailing comment\nmount_max = 1000\n", True),
    (b"#user_allow_other\n", False),
    (b"user_allow_other", False),  # fusermount3 ignores a last line without its newline
    (b"user_allow_other_not\n", False),
    (b"", False),
])
def test_user_allow_other_is_read_as_fusermount3_reads_it(conf, allowed):
    assert command.allows_other(conf) is allowed


def test_root_is_not_checked(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        missing("needs root")
    image = tmp_path / "disk.vhdx"
    image.write_bytes(b"")
    os.chmod(image, 0o444)
    (tmp_path / "mnt").mkdir(mode=0o555)
    conf = tmp_path / "fuse.conf"
    conf.write_bytes(b"#user_allow_other\n")
    monkeypatch.setattr(command, "FUSE_CONF", str(conf))
    monkeypatch.setattr(command, "FUSE_DEVICE", str(tmp_path / "no-such-device"))
    command.check_arguments(MountConfig(images=[str(image)], mountpoint=str(tmp_path / "mnt"), allow_other=True))
