"""Real mounts: a fixture that mounts images with the real CLI and always cleans up."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import need_root_fuse
from tests.helpers import vhdxfs


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

    def umount(self) -> None:
        result = vhdxfs("umount", self.mountpoint)
        assert result.returncode == 0, result.stderr
        self.mounted = False


@pytest.fixture
def mnt(tmp_path):
    need_root_fuse()
    point = tmp_path / "mnt"
    point.mkdir()
    m = Mount(point)
    try:
        yield m
    finally:
        if os.path.ismount(point):
            subprocess.run(["fusermount3", "-uz", str(point)], check=False)
            time.sleep(0.2)
