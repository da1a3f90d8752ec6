"""The product as users touch it: mount, read and write the raw file, unmount, find the image clean."""

from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import subprocess
import time

import pytest

from tests.helpers import make_dirty_image, make_image, need_tools, qemu_check_clean, run, sha256, vhdxfs
from vhdxfs.mount.daemon import state_file

MiB = 1 << 20


def test_random_reads_and_writes_match_a_model(tmp_path, mnt):
    need_tools("qemu-img")
    size = 64 * MiB
    image = make_image(tmp_path / "disk.vhdx", size, block_size=1 * MiB)
    mnt.mount(image)
    raw = mnt.raw("disk.raw")
    assert raw.stat().st_size == size
    model = bytearray(size)
    rnd = random.Random(11)
    fd = os.open(raw, os.O_RDWR)
    try:
        for _ in range(150):
            off = rnd.randrange(size)
            n = min(rnd.randrange(512, 4 * MiB + 1), size - off)
            if rnd.random() < 0.6:
                data = rnd.randbytes(n)
                assert os.pwrite(fd, data, off) == n
                model[off:off + n] = data
            else:
                assert os.pread(fd, n, off) == bytes(model[off:off + n])
        os.fsync(fd)
    finally:
        os.close(fd)
    mnt.umount()
    qemu_check_clean(image)
    out = tmp_path / "out.raw"
    assert run("qemu-img", "convert", "-O", "raw", image, out).returncode == 0
    assert out.read_bytes() == bytes(model)


def test_o_direct_io_as_a_vm_with_cache_none(tmp_path, mnt):
    need_tools("qemu-io", "qemu-img")
    image = make_image(tmp_path / "vm.vhdx", 32 * MiB)
    mnt.mount(image)
    result = run("qemu-io", "-f", "raw", "-t", "none", "-c", "write -P 0x5a 1M 3M", "-c", "read -P 0x5a 1M 3M",
                 "-c", "read -P 0 0 1M", mnt.raw("vm.raw"))
    assert result.returncode == 0 and "Pattern verification failed" not in result.stdout, result.stdout
    mnt.umount()
    qemu_check_clean(image)
    check = run("qemu-io", "-f", "vhdx", "-r", "-c", "read -P 0x5a 1M 3M", image)
    assert "Pattern verification failed" not in check.stdout, check.stdout


def test_ext4_on_a_loop_device_survives_the_round_trip(tmp_path, mnt):
    need_tools("losetup", "mkfs.ext4", "e2fsck", "debugfs", "qemu-img")
    image = make_image(tmp_path / "fs.vhdx", 128 * MiB)
    mnt.mount(image)
    loop = run("losetup", "-P", "--show", "-f", mnt.raw("fs.raw"))
    assert loop.returncode == 0, loop.stderr
    dev = loop.stdout.strip()
    fsdir = tmp_path / "fs"
    fsdir.mkdir()
    payload = os.urandom(3 * MiB + 123)
    try:
        assert run("mkfs.ext4", "-q", "-F", dev).returncode == 0
        assert run("mount", dev, fsdir).returncode == 0
        try:
            (fsdir / "a.bin").write_bytes(payload)
            (fsdir / "dir").mkdir()
            (fsdir / "dir" / "b.txt").write_text("hello vhdx\n")
        finally:
            assert run("umount", fsdir).returncode == 0
    finally:
        run("losetup", "-d", dev)
    mnt.umount()
    qemu_check_clean(image)
    out = tmp_path / "fs.raw"
    assert run("qemu-img", "convert", "-O", "raw", image, out).returncode == 0
    fsck = run("e2fsck", "-fn", out)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dumped = tmp_path / "a.out"
    assert run("debugfs", "-R", f"dump /a.bin {dumped}", out).returncode == 0
    assert dumped.read_bytes() == payload
    cat = run("debugfs", "-R", "cat /dir/b.txt", out)
    assert cat.stdout == "hello vhdx\n"


def test_fstrim_in_ext4_on_a_loop_device_gives_the_space_back(tmp_path, mnt):
    """The whole discard path: fstrim -> ext4 -> loop (fallocate PUNCH_HOLE) -> FUSE -> AsyncDisk.discard."""
    need_tools("losetup", "mkfs.ext4", "fstrim", "qemu-img")
    image = make_image(tmp_path / "trim.vhdx", 128 * MiB, block_size=1 * MiB)
    mnt.mount(image)
    loop = run("losetup", "--show", "-f", mnt.raw("trim.raw"))
    assert loop.returncode == 0, loop.stderr
    dev = loop.stdout.strip()
    fsdir = tmp_path / "fs"
    fsdir.mkdir()
    try:
        assert run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev).returncode == 0
        assert run("mount", dev, fsdir).returncode == 0
        try:
            (fsdir / "big").write_bytes(os.urandom(64 * MiB))
            assert run("sync", "-f", fsdir / "big").returncode == 0
            full = image.stat().st_blocks * 512
            (fsdir / "big").unlink()
            assert run("sync", "-f", fsdir).returncode == 0  # the free blocks must be committed to be trimmed
            trim = run("fstrim", "-v", fsdir)
            assert trim.returncode == 0, trim.stderr
        finally:
            assert run("umount", fsdir).returncode == 0
    finally:
        run("losetup", "-d", dev)
    mnt.umount()
    assert image.stat().st_blocks * 512 <= full - 48 * MiB, (full, image.stat().st_blocks * 512)
    qemu_check_clean(image)


def test_read_only_mount_refuses_writes_and_changes_no_byte(tmp_path, mnt):
    image = make_image(tmp_path / "ro.vhdx", 16 * MiB)
    digest = sha256(image)
    mnt.mount(image, options="ro")
    raw = mnt.raw("ro.raw")
    with pytest.raises(OSError) as exc:
        os.open(raw, os.O_WRONLY)
    assert exc.value.errno == errno.EROFS
    assert raw.read_bytes()[:4096] == bytes(4096)
    mnt.umount()
    assert sha256(image) == digest


def test_read_only_mount_of_a_dirty_log_shows_the_replayed_data(tmp_path, mnt):
    image = make_dirty_image(tmp_path / "crashed.vhdx", 16 * MiB, 0, b"\xab" * (2 * MiB))
    assert "log: dirty" in vhdxfs("info", image).stdout
    digest = sha256(image)
    mnt.mount(image, options="ro")
    assert mnt.raw("crashed.raw").read_bytes()[:2 * MiB] == b"\xab" * (2 * MiB)
    mnt.umount()
    assert sha256(image) == digest
    # A writable mount replays the log into the file for good.
    mnt.mount(image)
    assert mnt.raw("crashed.raw").read_bytes()[:2 * MiB] == b"\xab" * (2 * MiB)
    mnt.umount()
    assert "log: clean" in vhdxfs("info", image).stdout
    qemu_check_clean(image)


def test_two_images_in_one_mount_and_clashing_names_refused(tmp_path, mnt):
    a = make_image(tmp_path / "a.vhdx", 8 * MiB)
    b = make_image(tmp_path / "b.vhdx", 16 * MiB)
    (tmp_path / "other").mkdir()
    clash = make_image(tmp_path / "other" / "a.vhdx", 8 * MiB)
    result = mnt.mount(a, clash, expect_ok=False)
    assert result.returncode == 1 and "a.raw" in result.stderr
    assert not os.path.ismount(mnt.mountpoint)
    mnt.mount(a, b)
    assert sorted(os.listdir(mnt.mountpoint)) == ["a.raw", "b.raw"]
    assert mnt.raw("b.raw").stat().st_size == 16 * MiB
    mnt.umount()


def test_a_second_writer_is_refused_with_a_clear_message(tmp_path, mnt):
    image = make_image(tmp_path / "busy.vhdx", 8 * MiB)
    mnt.mount(image)
    other = tmp_path / "other"
    other.mkdir()
    result = vhdxfs("mount", image, other)
    assert result.returncode == 1
    assert str(image) in result.stderr and "in use" in result.stderr
    assert not os.path.ismount(other)
    mnt.umount()


def test_mount_time_failures_leave_no_stale_mount(tmp_path, mnt):
    bad = tmp_path / "bad.vhdx"
    bad.write_bytes(b"not a vhdx" * 100000)
    result = mnt.mount(bad, expect_ok=False)
    assert result.returncode == 1 and "not a VHDX file" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not os.path.ismount(mnt.mountpoint)
    result = vhdxfs("mount", make_image(tmp_path / "ok.vhdx", 8 * MiB), tmp_path / "missing")
    assert result.returncode == 1 and "mount point" in result.stderr


@pytest.mark.parametrize("how", ["sigterm", "fusermount"])
def test_stopping_while_writing_leaves_a_clean_image(tmp_path, mnt, how):
    need_tools("qemu-img")
    image = make_image(tmp_path / "stop.vhdx", 64 * MiB, block_size=1 * MiB)
    mnt.mount(image)
    pid = int(state_file(mnt.mountpoint).read_text().split()[0])
    writer = subprocess.Popen(["dd", "if=/dev/urandom", f"of={mnt.raw('stop.raw')}", "bs=1M", "count=60",
                               "conv=notrunc"], stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    if how == "sigterm":
        os.kill(pid, signal.SIGTERM)
    else:
        subprocess.run(["fusermount3", "-uz", str(mnt.mountpoint)], check=True)
    writer.wait(timeout=30)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), "daemon did not exit"
    assert not os.path.ismount(mnt.mountpoint)
    qemu_check_clean(image)
    assert "log: clean" in vhdxfs("info", image).stdout


def test_discard_reads_zeros_and_returns_host_space(tmp_path, mnt):
    import pyfuse3

    assert getattr(pyfuse3, "FALLOCATE_SUPPORTED", False), "pyfuse3 lacks fallocate: run ./setup.sh"
    need_tools("fallocate", "qemu-img")
    image = make_image(tmp_path / "trim.vhdx", 64 * MiB, block_size=1 * MiB)
    mnt.mount(image)
    raw = mnt.raw("trim.raw")
    with open(raw, "r+b") as f:
        f.write(os.urandom(24 * MiB))
        f.flush()
        os.fsync(f.fileno())
    used = image.stat().st_blocks
    assert run("fallocate", "--punch-hole", "--keep-size", "-o", str(2 * MiB), "-l", str(16 * MiB), raw).returncode == 0
    assert run("fallocate", "-p", "-o", "100", "-l", "1000", raw).returncode == 0  # partial: zeroed in place
    with open(raw, "rb") as f:
        data = f.read(24 * MiB)
    assert data[100:1100] == bytes(1000) and data[2 * MiB:18 * MiB] == bytes(16 * MiB)
    assert data[1100:2 * MiB] != bytes(2 * MiB - 1100)
    assert image.stat().st_blocks * 512 <= used * 512 - 15 * MiB  # the host got the space back
    zero_range = run("fallocate", "-z", "-o", "0", "-l", str(MiB), raw)
    assert zero_range.returncode != 0  # modes we do not do fail cleanly (EOPNOTSUPP)
    mnt.umount()
    qemu_check_clean(image)


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.parametrize("options", [None, "poll_us=1000", "poll_us=0"])
def test_the_request_loop_polls_only_while_requests_keep_coming(tmp_path, mnt, options):
    """The loop polls /dev/fuse for the next request before it sleeps (pyfuse3 patched, -o poll_us): a stream
    of QD1 reads and writes is served right, and once it stops the daemon sleeps, spinning for nothing."""
    image = make_image(tmp_path / "p.vhdx", 64 * MiB)
    mnt.mount(image, options=options)
    fd = os.open(mnt.raw("p.raw"), os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    try:
        rng = random.Random(7)
        written = {}
        for _ in range(3000):  # back to back: the window grows to its longest
            off = rng.randrange(0, 64 * MiB // 4096) * 4096
            if rng.random() < 0.5:
                buf[:] = bytes([rng.randrange(256)]) * 4096
                assert os.pwritev(fd, [buf], off) == 4096
                written[off] = bytes(buf)
            else:
                assert os.preadv(fd, [buf], off) == 4096
                assert bytes(buf) == written.get(off, bytes(4096))
        pid = mnt.daemon_pid()
        time.sleep(0.2)
        before = _cpu_seconds(pid)
        time.sleep(2)
        assert _cpu_seconds(pid) - before < 0.2, "the idle daemon kept polling"
    finally:
        os.close(fd)
    mnt.umount()
    qemu_check_clean(image)


def test_poll_us_takes_a_number(tmp_path, mnt):
    image = make_image(tmp_path / "p.vhdx", 8 * MiB)
    result = mnt.mount(image, options="poll_us=soon", expect_ok=False)
    assert result.returncode != 0 and "poll_us=soon: poll_us takes a number" in result.stderr, result.stderr
