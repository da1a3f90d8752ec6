"""A full host disk: every command that writes a file fails with one line that names that file.

`vhdxfs: /full/x.vhdx: No space left on device`, exit status 1, never a bare "No space left on device"
that leaves the user to guess which of two files (source or output, child or parent) is meant. What the
command changed in place stays a consistent image; what it was creating is not left behind half made.

Each case prepares its inputs while there is room, fills the host file system (a small ext4 on a loop
device: tests/conftest.py, ``small_fs``) to the last block, then runs the command as a user would.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import vhdxfs
from tests.helpers import make_dirty_image, make_image, on_disk
from tests.helpers import vhdxfs as cli
from vhdxfs.engine import create_child as create_child_image

MiB = 1 << 20
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def fill(directory: Path) -> None:
    """Take every block left (root's reserved ones too: the tests run as root). Closing a file gives back
    what ext4 had set aside for it beyond its end, so files are added until one gets nothing at all."""
    for n in itertools.count():
        written = 0
        with open(directory / f"filler{n}", "wb", buffering=0) as f:
            for chunk in (MiB, 4096):
                try:
                    while True:
                        written += f.write(bytes(chunk)) or 0
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
            with contextlib.suppress(OSError):
                os.fsync(f.fileno())
        if not written:
            return


def write_data(image: Path, blocks: range, zero_every: int = 0) -> None:
    with vhdxfs.open(image, "r+b") as disk:
        for i in blocks:
            zero = zero_every and i % zero_every == 0
            disk.pwrite(i * MiB, bytes(MiB) if zero else os.urandom(MiB))


def punch(path: Path, offset: int, length: int) -> None:
    """A hole where the file held zeros, as `cp --sparse=always` leaves one: writing there needs space."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_long(offset),
                          ctypes.c_long(length)) != 0:
            raise OSError(ctypes.get_errno(), "fallocate")
    finally:
        os.close(fd)


@dataclass
class Case:
    """``prepare(full, room)`` makes the inputs (``full`` is the disk that fills up, ``room`` has space) and
    returns the command's arguments and the file the message must name."""

    prepare: Callable[[Path, Path], tuple[list[str], Path]]
    creates: bool  # the named file is new: it must not be left behind


def create_fixed(full: Path, room: Path) -> tuple[list[str], Path]:
    return ["create", "--type", "fixed", "--size", "100M", str(full / "fixed.vhdx")], full / "fixed.vhdx"


def create_dynamic(full: Path, room: Path) -> tuple[list[str], Path]:
    return ["create", "--size", "10G", str(full / "dynamic.vhdx")], full / "dynamic.vhdx"


def create_child(full: Path, room: Path) -> tuple[list[str], Path]:
    parent = make_image(room / "parent.vhdx", 100 * MiB)
    return ["create", "--parent", str(parent), str(full / "child.avhdx")], full / "child.avhdx"


def convert_raw_to_vhdx(full: Path, room: Path) -> tuple[list[str], Path]:
    source = room / "source.raw"
    source.write_bytes(os.urandom(60 * MiB))
    return ["convert", str(source), str(full / "out.vhdx")], full / "out.vhdx"


def vhdx_source(room: Path) -> Path:
    source = make_image(room / "source.vhdx", 100 * MiB, block_size=MiB)
    write_data(source, range(60))
    return source


def convert_vhdx_to_raw(full: Path, room: Path) -> tuple[list[str], Path]:
    return ["convert", str(vhdx_source(room)), str(full / "out.raw")], full / "out.raw"


def convert_vhdx_to_vhdx(full: Path, room: Path) -> tuple[list[str], Path]:
    return ["convert", str(vhdx_source(room)), str(full / "out.vhdx")], full / "out.vhdx"


def resize_grow(full: Path, room: Path) -> tuple[list[str], Path]:
    image = make_image(full / "grow.vhdx", 1 << 30)  # 60 TiB needs a BAT of 60 MiB
    return ["resize", str(image), "60T"], image


def compact_sparse_copy(full: Path, room: Path) -> tuple[list[str], Path]:
    """Compact moves blocks from the end of the file into the space of all-zero blocks; on an image copied
    sparse those are holes already, so the moves need new space."""
    made = make_image(room / "compact.vhdx", 100 * MiB, block_size=MiB)
    write_data(made, range(30), zero_every=2)
    image = full / "compact.vhdx"
    subprocess.run(["cp", "--sparse=always", str(made), str(image)], check=True)
    return ["compact", str(image)], image


def commit_into_full_parent(full: Path, room: Path) -> tuple[list[str], Path]:
    parent = make_image(full / "parent.vhdx", 100 * MiB)
    child = room / "child.avhdx"
    create_child_image(child, parent)
    write_data(child, range(60))
    return ["commit", str(child)], parent


def repair_into_a_hole(full: Path, room: Path) -> tuple[list[str], Path]:
    """A dirty log whose replay writes a BAT page where a sparse copy left a hole."""
    image = make_dirty_image(full / "dirty.vhdx", 100 * MiB, 50 * MiB, os.urandom(MiB))
    layout = on_disk(image)
    punch(image, layout.bat.region_offset, layout.geometry.bat_region_length)
    return ["check", "--repair", str(image)], image


CASES = {
    "create --type fixed": Case(create_fixed, creates=True),
    "create (dynamic)": Case(create_dynamic, creates=True),
    "create --parent": Case(create_child, creates=True),
    "convert raw -> vhdx": Case(convert_raw_to_vhdx, creates=True),
    "convert vhdx -> raw": Case(convert_vhdx_to_raw, creates=True),
    "convert vhdx -> vhdx": Case(convert_vhdx_to_vhdx, creates=True),
    "resize (grow)": Case(resize_grow, creates=False),
    "compact": Case(compact_sparse_copy, creates=False),
    "commit": Case(commit_into_full_parent, creates=False),
    "check --repair": Case(repair_into_a_hole, creates=False),
}


def cases() -> list:
    return [pytest.param(case, id=name) for name, case in CASES.items()]


@pytest.mark.parametrize("case", cases())
def test_a_full_disk_error_names_the_file(case, small_fs, tmp_path):
    room = tmp_path / "room"
    room.mkdir()
    args, named = case.prepare(small_fs, room)
    fill(small_fs)
    result = cli(*args)
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("vhdxfs: ") and line.endswith(": No space left on device"), line
    said = line.removeprefix("vhdxfs: ").removesuffix(": No space left on device")
    # The path as the command met it: a parent found through the child's relative locator reads
    # "<child's directory>/../<parent's directory>/parent.vhdx".
    assert os.path.realpath(said) == os.path.realpath(named), line
    if case.creates:
        assert not named.exists(), "a half-made output was left behind"
    else:
        for filler in small_fs.glob("filler*"):
            filler.unlink()
        checked = cli("check", named)
        assert checked.returncode == 0, checked.stdout + checked.stderr
