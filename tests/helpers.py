"""Small helpers shared by tests: running the CLI and the peers, hashing files, skipping when the
environment lacks a tool.

Tests that need root, /dev/fuse, loop devices or the QEMU/libvhdi peers call ``need_tools`` /
``need_root_fuse``: on a developer machine without them they skip, but with VHDXFS_REQUIRE_FUSE=1 (set by
.ci/run) a missing requirement fails the test instead, so CI can never pass by skipping.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhdxfs.engine import ImageSpec, create_image

REQUIRE = os.environ.get("VHDXFS_REQUIRE_FUSE") == "1"


def missing(reason: str) -> None:
    """Skip, or fail when CI demands that every environment-dependent test runs."""
    if REQUIRE:
        pytest.fail(f"required by VHDXFS_REQUIRE_FUSE=1 but unavailable: {reason}")
    pytest.skip(reason)


def need_tools(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            missing(f"{name} is not installed")


def need_root_fuse() -> None:
    if os.geteuid() != 0:
        missing("needs root")
    if not Path("/dev/fuse").exists():
        missing("needs /dev/fuse")
    need_tools("fusermount3")


def vhdxfs(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real command line in a child process, as a user would."""
    return subprocess.run([sys.executable, "-m", "vhdxfs.cli", *map(str, args)], capture_output=True,
                          text=True, check=check)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, args)], capture_output=True, text=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_image(path: Path, size: int, **kw) -> Path:
    create_image(path, ImageSpec(size, **kw))
    return path


def qemu_check_clean(path: Path) -> None:
    result = run("qemu-img", "check", "-f", "vhdx", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found" in result.stdout


def make_dirty_image(path: Path, size: int, offset: int, data: bytes) -> Path:
    """An image whose only record of a write's allocation is in the log, as after a crash between the
    log write and its application: LogGuid set, the BAT in place still as before the write."""
    from vhdxfs.engine import Disk, MemoryFile

    make_image(path, size, block_size=1 << 20)
    image = on_disk(path)
    bat = slice(image.bat.region_offset, image.bat.region_offset + image.geometry.bat_region_length)
    memory = MemoryFile(path.read_bytes(), path=path)  # the medium: what a crash would leave of it is ours
    disk = Disk.open(path, host_factory=lambda p, writable: memory)
    disk.write(offset, data)
    disk.flush()  # the entry is in the log and its pages in place; never closed, so LogGuid stays set
    memory.data[bat] = path.read_bytes()[bat]  # undo the in-place application: the log alone knows
    path.write_bytes(memory.data)
    return path


async def random_step(disk, model: bytearray, rnd, length: int, discard_ratio: float = 0.15) -> None:
    """One write of random bytes, or a discard, of ``length`` bytes at a random offset; mirrored in ``model``."""
    off = rnd.randrange(len(model))
    n = min(length, len(model) - off)
    if rnd.random() < discard_ratio:
        await disk.discard(off, n)
        model[off:off + n] = bytes(n)
    else:
        data = rnd.randbytes(n)
        await disk.write(off, data)
        model[off:off + n] = data


async def probe_read(disk, model: bytearray, rnd, max_length: int) -> None:
    """A read at a random place must return what the model holds."""
    off = rnd.randrange(len(model))
    n = min(rnd.randrange(1, max_length), len(model) - off)
    assert await disk.read(off, n) == bytes(model[off:off + n])


def on_disk(path: Path):
    """The image's structures as the file holds them now (a test seam: vhdxfs.engine.image.VhdxFile, read
    past the lock of a writer that has it open; a dirty log is replayed in memory)."""
    import functools

    from vhdxfs.engine import PosixFile
    from vhdxfs.engine.image import VhdxFile

    image = VhdxFile.open(path, read_only=True, host_factory=functools.partial(PosixFile, lock=False))
    image.close()
    return image


def seed_dirs(tmp_path: Path, seeds: range) -> Iterator[tuple[int, Path]]:
    """A fresh work directory per seed, removed once the seed has passed (a failing seed's stays for
    inspection): the power-cut survivors alone would otherwise fill tens of GB in one stress run."""
    for seed in seeds:
        work = tmp_path / str(seed)
        work.mkdir()
        yield seed, work
        shutil.rmtree(work)
