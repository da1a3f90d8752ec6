"""Shared fixtures.

Pytest hooks and fixtures only. Helpers that tests import (``need_tools``, ``need_root_fuse``, ``missing``:
skip on a developer machine, fail under VHDXFS_REQUIRE_FUSE=1) live in tests/helpers.py.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import missing, need_tools


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--stress", action="store_true", help="run the long stress variants")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--stress"):
        return
    skip = pytest.mark.skip(reason="stress run: use --stress")
    for item in items:
        if "stress" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def qemu_img() -> str:
    need_tools("qemu-img")
    return "qemu-img"


@pytest.fixture
def small_fs(tmp_path):
    """A 48 MiB ext4 filesystem on a loop device, mounted at tmp_path/small: a host disk that fills up."""
    if os.geteuid() != 0:
        missing("needs root for a loop-mounted filesystem")
    need_tools("mkfs.ext4", "losetup", "qemu-img")
    backing = tmp_path / "small.ext4"
    with open(backing, "wb") as f:
        f.truncate(48 << 20)
    assert subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], capture_output=True).returncode == 0
    mnt = tmp_path / "small"
    mnt.mkdir()
    result = subprocess.run(["mount", "-o", "loop", str(backing), str(mnt)], capture_output=True, text=True)
    if result.returncode != 0:
        missing(f"cannot loop-mount: {result.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
