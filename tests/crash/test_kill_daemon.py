"""kill -9 of the real daemon under fsync'd load: the image opens, checks clean, keeps every fsync'd write."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time

import pytest

from tests.helpers import make_image, need_root_fuse, need_tools, qemu_check_clean, vhdxfs
from vhdxfs.mount.daemon import state_file
from vhdxfs.tools.check import check_image

MiB = 1 << 20
SIZE = 96 * MiB
SLOT = 64 * 1024


def writer(raw, slots: list[int], ledger: dict[int, bytes], stop: threading.Event, seed: int) -> None:
    """Write each slot once with random data and fsync; a slot enters the ledger only after its fsync."""
    rnd = random.Random(seed)
    try:
        fd = os.open(raw, os.O_RDWR)
    except OSError:
        return
    try:
        for slot in slots:
            if stop.is_set():
                return
            data = rnd.randbytes(SLOT)
            os.pwrite(fd, data, slot * SLOT)
            os.fsync(fd)
            ledger[slot] = data
    except OSError:
        return  # the daemon died under us
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def one_round(tmp_path, image, mountpoint, rnd: random.Random, written: dict[int, bytes]) -> None:
    result = vhdxfs("mount", image, mountpoint)
    assert result.returncode == 0, result.stderr
    pid = int(state_file(mountpoint).read_text().split()[0])
    free = [s for s in range(SIZE // SLOT) if s not in written]
    rnd.shuffle(free)
    ledger: dict[int, bytes] = {}
    stop = threading.Event()
    thread = threading.Thread(target=writer, args=(mountpoint / "load.raw", free, ledger, stop, rnd.random()))
    thread.start()
    time.sleep(rnd.uniform(0.2, 0.8))
    os.kill(pid, signal.SIGKILL)
    stop.set()
    thread.join(timeout=30)
    after_kill(pid, mountpoint)
    written.update(ledger)
    # The survivor: a dirty log is fine (a read-only check replays it in memory), inconsistency is not.
    assert check_image(str(image))["status"] == "clean"


def after_kill(pid: int, mountpoint) -> None:
    """The killed daemon's mount detached, the process gone, its stale pid record and log removed."""
    subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    state_file(mountpoint).unlink(missing_ok=True)
    state_file(mountpoint).with_suffix(".log").unlink(missing_ok=True)


@pytest.mark.parametrize("rounds", [3], ids=["ci"])
def test_kill_9_under_fsynced_load(tmp_path, rounds):
    run_rounds(tmp_path, rounds)


@pytest.mark.stress
def test_kill_9_under_fsynced_load_stress(tmp_path):
    run_rounds(tmp_path, 20)


def run_rounds(tmp_path, rounds: int) -> None:
    need_root_fuse()
    need_tools("qemu-img")
    image = make_image(tmp_path / "load.vhdx", SIZE, block_size=1 * MiB)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    rnd = random.Random(99)
    written: dict[int, bytes] = {}
    for _ in range(rounds):
        one_round(tmp_path, image, mountpoint, rnd, written)
    assert written, "the load must have fsync'd some writes before the kills"
    # Remount (replaying the log), verify the ledger through the raw file, unmount, QEMU agrees.
    assert vhdxfs("mount", image, mountpoint).returncode == 0
    try:
        with open(mountpoint / "load.raw", "rb") as f:
            for slot, data in written.items():
                f.seek(slot * SLOT)
                assert f.read(SLOT) == data, f"fsync'd write at slot {slot} lost"
    finally:
        assert vhdxfs("umount", mountpoint).returncode == 0
    qemu_check_clean(image)
