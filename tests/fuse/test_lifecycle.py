"""The daemon's life with real mounts: what users see when mounting fails, when it dies, when they stop it."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import make_image, need_tools, qemu_check_clean, vhdxfs
from vhdxfs.mount.daemon import state_file
from vhdxfs.mount.mounts import DEAD_ERRNOS, find_mount

MiB = 1 << 20


def alive(pid: int) -> bool:
    """Running, not a zombie: a daemon that exited may wait a moment for its reaper (init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


def test_umount_returns_after_the_daemon_has_closed_every_image(tmp_path, mnt):
    a = make_image(tmp_path / "a.vhdx", 8 * MiB)
    b = make_image(tmp_path / "b.vhdx", 8 * MiB)
    mnt.mount(a, b)
    pid = mnt.daemon_pid()
    for name in ("a.raw", "b.raw"):
        with open(mnt.raw(name), "r+b") as f:
            f.write(os.urandom(3 * MiB))  # allocations: the log is in use until the clean close
    mnt.umount()
    assert not alive(pid), "umount returned while the daemon was still running"
    assert not state_file(mnt.mountpoint).exists()
    for image in (a, b):
        assert "log: clean" in vhdxfs("info", image).stdout


def test_a_dead_mount_is_reported_and_removed_by_umount(tmp_path, mnt):
    image = make_image(tmp_path / "dead.vhdx", 8 * MiB)
    mnt.mount(image)
    with open(mnt.raw("dead.raw"), "r+b") as f:
        f.write(b"\x42" * MiB)
        os.fsync(f.fileno())
    pid = mnt.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    with pytest.raises(OSError) as exc:
        os.listdir(mnt.mountpoint)
    assert exc.value.errno in DEAD_ERRNOS
    again = vhdxfs("mount", image, mnt.mountpoint)
    assert again.returncode == 1 and "dead fuse.vhdxfs mount" in again.stderr and "vhdxfs umount" in again.stderr
    result = vhdxfs("umount", mnt.mountpoint)
    assert result.returncode == 1 and "daemon had died" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1
    assert find_mount(mnt.mountpoint) is None
    assert not state_file(mnt.mountpoint).exists()
    # The image was never closed; the next writable mount replays its log and the fsync'd data is there.
    mnt.mount(image)
    with open(mnt.raw("dead.raw"), "rb") as f:
        assert f.read(MiB) == b"\x42" * MiB
    mnt.umount()
    qemu_check_clean(image)


def test_a_busy_mount_point_is_refused_and_the_mount_there_keeps_serving(tmp_path, mnt):
    first = make_image(tmp_path / "first.vhdx", 8 * MiB)
    second = make_image(tmp_path / "second.vhdx", 8 * MiB)
    mnt.mount(first)
    result = vhdxfs("mount", second, mnt.mountpoint)
    assert result.returncode == 1 and "already mounted" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1
    assert os.listdir(mnt.mountpoint) == ["first.raw"]
    mnt.umount()
    not_ours = vhdxfs("umount", mnt.mountpoint)
    assert not_ours.returncode == 1 and "not mounted" in not_ours.stderr


@pytest.mark.parametrize("option", ["bogus_option", "max_read=1048576"])
def test_a_bad_fuse_option_fails_in_one_line_and_leaves_nothing_mounted(tmp_path, mnt, option):
    image = make_image(tmp_path / "opt.vhdx", 8 * MiB)
    result = mnt.mount(image, options=option, expect_ok=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and option.split("=")[0] in result.stderr, result.stderr
    assert find_mount(mnt.mountpoint) is None
    assert "log: clean" in vhdxfs("info", image).stdout
    # and the lock was released: the image mounts right away
    mnt.mount(image)
    mnt.umount()


def test_owner_mode_size_rules_and_statfs_through_the_kernel(tmp_path, mnt):
    image = make_image(tmp_path / "attr.vhdx", 16 * MiB)
    mnt.mount(image, options="uid=4321,gid=8765")
    raw = mnt.raw("attr.raw")
    st = raw.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777, st.st_size) == (4321, 8765, 0o644, 16 * MiB)
    assert mnt.mountpoint.stat().st_mode & 0o7777 == 0o755
    with pytest.raises(OSError) as exc:
        os.truncate(raw, 8 * MiB)
    assert exc.value.errno == errno.EPERM
    os.truncate(raw, 16 * MiB)  # the same size is fine
    fd = os.open(raw, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"abcdef", 16 * MiB - 3) == 3  # cut at the end of the disk, like a block device
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"x", 16 * MiB)
        assert exc.value.errno == errno.ENOSPC
        os.posix_fallocate(fd, 0, MiB)  # allocation inside the disk succeeds (space comes on write)
    finally:
        os.close(fd)
    vfs = os.statvfs(mnt.mountpoint)
    assert vfs.f_blocks * vfs.f_frsize == 16 * MiB
    with open(raw, "rb") as f:
        f.seek(16 * MiB - 3)
        assert f.read() == b"abc"
    mnt.umount()
    qemu_check_clean(image)


def test_concurrent_writers_and_readers_through_one_raw_file(tmp_path, mnt):
    """Many requests in flight at once (pyfuse3 serves them in parallel tasks): disjoint regions stay intact."""
    size = 48 * MiB
    image = make_image(tmp_path / "par.vhdx", size, block_size=1 * MiB)
    mnt.mount(image)
    raw = mnt.raw("par.raw")
    region = size // 6
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        rnd = random.Random(k)
        model = bytearray(region)
        base = k * region
        try:
            fd = os.open(raw, os.O_RDWR)
            try:
                for _ in range(30):
                    off = rnd.randrange(region)
                    n = min(rnd.randrange(512, 2 * MiB), region - off)
                    data = rnd.randbytes(n)
                    assert os.pwrite(fd, data, base + off) == n
                    model[off:off + n] = data
                    probe = rnd.randrange(region)
                    m = min(rnd.randrange(1, MiB), region - probe)
                    assert os.pread(fd, m, base + probe) == bytes(model[probe:probe + m])
                os.fsync(fd)
                assert os.pread(fd, region, base) == bytes(model)
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    mnt.umount()
    qemu_check_clean(image)


def test_a_second_signal_while_closing_does_not_cut_the_close_short(tmp_path, mnt):
    need_tools("qemu-img")
    image = make_image(tmp_path / "twice.vhdx", 32 * MiB, block_size=1 * MiB)
    daemon = subprocess.Popen([sys.executable, "-m", "vhdxfs.cli", "mount", "--foreground", str(image),
                               str(mnt.mountpoint)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while find_mount(mnt.mountpoint) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with open(mnt.raw("twice.raw"), "r+b") as f:
            f.write(os.urandom(24 * MiB))  # many new blocks: the close has a log to apply
        daemon.send_signal(signal.SIGINT)
        for _ in range(5):
            time.sleep(0.01)
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGINT)
        assert daemon.wait(timeout=30) == 0
        err = daemon.stderr.read()
        assert "Traceback" not in err and "closed cleanly" in err, err
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert find_mount(mnt.mountpoint) is None
    qemu_check_clean(image)
    assert "log: clean" in vhdxfs("info", image).stdout


def test_the_daemon_keeps_no_directory_busy_and_logs_somewhere(tmp_path, mnt):
    image = make_image(tmp_path / "cwd.vhdx", 8 * MiB)
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = subprocess.run([sys.executable, "-m", "vhdxfs.cli", "mount", str(image), str(mnt.mountpoint)],
                            cwd=workdir, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert result.returncode == 0, result.stderr
    pid = mnt.daemon_pid()
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    log_file = state_file(mnt.mountpoint).with_suffix(".log")
    no_syslog = not Path("/dev/log").exists()
    if no_syslog:  # the daemon's log goes to a file beside its pid record instead
        assert "mounted" in log_file.read_text()
    mnt.umount()
    assert wait_gone(pid)
    assert not state_file(mnt.mountpoint).exists()
    assert not log_file.exists()  # a clean life with nothing worth reading leaves no file behind


def test_a_lazily_unmounted_daemon_leaves_a_new_mount_on_the_same_directory_alone(tmp_path, mnt):
    """The old daemon always asks libfuse to unmount on its way out; that must not hit the new mount."""
    need_tools("qemu-io", "qemu-img")
    old = make_image(tmp_path / "old.vhdx", 8 * MiB)
    new = make_image(tmp_path / "new.vhdx", 8 * MiB)
    mnt.mount(old)
    old_pid = mnt.daemon_pid()
    held = open(mnt.raw("old.raw"), "r+b")  # keeps the old session alive after the lazy unmount
    try:
        assert subprocess.run(["fusermount3", "-uz", str(mnt.mountpoint)]).returncode == 0
        mnt.mount(new)
        held.write(b"still served")
        held.flush()
    finally:
        held.close()
    assert wait_gone(old_pid), "the old daemon did not exit when its last file was closed"
    assert os.listdir(mnt.mountpoint) == ["new.raw"]  # still mounted, still served
    mnt.umount()
    for image in (old, new):
        qemu_check_clean(image)
    dump = subprocess.run(["qemu-io", "-f", "vhdx", "-r", "-c", "read -v 0 12", str(old)], capture_output=True,
                          text=True)
    assert "still.served" in dump.stdout, dump.stdout  # the write through the detached mount was kept
