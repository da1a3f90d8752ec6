"""Real mounts: a fixture that mounts images with the real CLI and always cleans up."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import need_root_fuse, vhdxfs
from vhdxfs.mount.daemon import read_state, state_file
from vhdxfs.mount.mounts import find_mount


class Mount:
    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.mounted = False

    def mount(self, *images: Path, options: str | None = None, expect_ok: bool = True):
        args = ["mount", *images, self.mountpoint]
        if options:
            args[1:1] = ["-o", options]
        result = vhdxfs(*args)
        if expect_ok:
            assert result.returncode == 0, result.stderr
            self.mounted = True
        return result

    def raw(self, name: str) -> Path:
        return self.mountpoint / name

    def daemon_pid(self) -> int:
        pid = read_state(self.mountpoint)
        assert pid is not None, "no live daemon recorded for the mount"
        return pid

    def umount(self) -> None:
        result = vhdxfs("umount", self.mountpoint)
        assert result.returncode == 0, result.stderr
        self.mounted = False


def detach_loops_under(directory: Path) -> None:
    """Loop devices whose backing file lies in ``directory`` (a test that failed before losetup -d)."""
    out = subprocess.run(["losetup", "--json", "-O", "NAME,BACK-FILE", "-l"], capture_output=True, text=True)
    devices = json.loads(out.stdout or "{}").get("loopdevices", [])
    for dev in devices:
        if (dev.get("back-file") or "").startswith(f"{directory}/"):
            subprocess.run(["losetup", "-d", dev["name"]], check=False)


def force_unmount(point: Path) -> None:
    """Whatever state a test left: live, busy or dead (ENOTCONN, which os.path.ismount cannot see)."""
    if find_mount(point) is None:
        return
    pid = read_state(point)
    detach_loops_under(point)
    subprocess.run(["fusermount3", "-uz", str(point)], check=False)
    deadline = time.monotonic() + 30
    while pid is not None and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)


@contextmanager
def loop_ready_mount(tmp_path: Path) -> Iterator[Mount]:
    """A Mount at tmp_path/mnt for tests that put loop devices on its raw files: the loops detached, then the
    mount forced off, whatever the test left."""
    need_root_fuse()
    point = tmp_path / "mnt"
    point.mkdir()
    try:
        yield Mount(point)
    finally:
        detach_loops_under(point)
        force_unmount(point)


@pytest.fixture
def mnt(tmp_path):
    need_root_fuse()
    point = tmp_path / "mnt"
    point.mkdir()
    m = Mount(point)
    try:
        yield m
    finally:
        force_unmount(point)
        # A daemon without syslog logs beside its pid record and keeps the file after a crash; tests that
        # crash one on purpose must not leave it in /run.
        state_file(point).unlink(missing_ok=True)
        state_file(point).with_suffix(".log").unlink(missing_ok=True)
