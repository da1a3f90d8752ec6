"""st_blocks is true from the first answer the kernel gets, whichever request that is.

The kernel keeps a file's attributes for attr_timeout (an hour) from whichever reply gave them first: a
lookup, a getattr, a setattr, or the entries of a readdirplus, which pyfuse3 uses for every readdir. An
`ls` of the mount point right after mounting used to answer "the whole disk is allocated" there, so stat
said so for the next hour, and `cp --sparse=auto` copied every byte of the disk.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from types import SimpleNamespace

import pyfuse3
import pytest

import vhdxfs
from tests.fuse.fakedisk import FakeDisk
from tests.helpers import make_image, need_tools
from vhdxfs.errors import HostIOError
from vhdxfs.mount.allocation import ALLOCATION_RECOUNT
from vhdxfs.mount.operations import RawFilesOperations

MiB, GiB = 1 << 20, 1 << 30
CTX = SimpleNamespace(uid=0, gid=0, pid=1, umask=0o022)


def setattr_fields() -> SimpleNamespace:
    names = ("update_size", "update_mode", "update_uid", "update_gid", "update_atime", "update_mtime",
             "update_ctime")
    return SimpleNamespace(**{n: n == "update_mtime" for n in names})


async def test_every_reply_about_a_file_carries_the_counted_blocks(monkeypatch):
    disk = FakeDisk("/i/a.vhdx", 64 * MiB)
    disk.data[MiB:MiB + 10] = b"x" * 10  # one 64 KiB grain holds data
    ops = RawFilesOperations([disk], read_only=False, uid=0, gid=0)
    listed: list[pyfuse3.EntryAttributes] = []
    monkeypatch.setattr(pyfuse3, "readdir_reply", lambda token, name, attrs, next_id: listed.append(attrs) or True)
    await ops.readdir(pyfuse3.ROOT_INODE, 0, None)
    inode = listed[0].st_ino
    replies = {"readdirplus": listed[0],
               "lookup": await ops.lookup(pyfuse3.ROOT_INODE, b"a.raw", CTX),
               "getattr": await ops.getattr(inode, CTX),
               "setattr": await ops.setattr(inode, pyfuse3.EntryAttributes(), setattr_fields(), None, CTX)}
    assert {name: a.st_blocks for name, a in replies.items()} == dict.fromkeys(replies, 65536 // 512)
    assert all(a.st_size == 64 * MiB for a in replies.values())
    # This stand-in counts no requests, so the kernel may keep a count only until it is due again.
    assert all(0 <= a.attr_timeout <= ALLOCATION_RECOUNT for a in replies.values())


async def test_a_count_that_fails_answers_eio_and_the_loop_goes_on(monkeypatch):
    """Counting reads the image (its BAT, through the chain): a host error there is the request's EIO,
    never an exception that would end pyfuse3's loop, whichever request counted."""
    disk = FakeDisk("/i/a.vhdx", 8 * MiB)
    ops = RawFilesOperations([disk], read_only=False, uid=0, gid=0)

    async def failing(offset: int = 0, length: int | None = None) -> list:
        raise HostIOError("Input/output error", path=disk.path, errno=errno.EIO)

    monkeypatch.setattr(disk, "extents", failing)
    monkeypatch.setattr(pyfuse3, "readdir_reply", lambda *args: True)
    inode = pyfuse3.ROOT_INODE + 1
    for request in (ops.readdir(pyfuse3.ROOT_INODE, 0, None), ops.lookup(pyfuse3.ROOT_INODE, b"a.raw", CTX),
                    ops.getattr(inode, CTX), ops.setattr(inode, pyfuse3.EntryAttributes(), setattr_fields(), None,
                                                         CTX)):
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await request
        assert exc.value.errno == errno.EIO


def write_at(image, places: list[int]) -> None:
    with vhdxfs.open(image, "r+b") as disk:
        for offset in places:
            disk.pwrite(offset, os.urandom(MiB))


def test_the_first_stat_after_a_listing_is_true_and_cp_copies_sparse(tmp_path, mnt):
    need_tools("cp")
    image = make_image(tmp_path / "first.vhdx", 1 * GiB, block_size=MiB)
    write_at(image, [0, 500 * MiB, 1023 * MiB])
    mnt.mount(image)
    assert os.listdir(mnt.mountpoint) == ["first.raw"]  # readdirplus: the kernel caches these attributes
    st = os.stat(mnt.raw("first.raw"))
    assert (st.st_size, st.st_blocks * 512) == (1 * GiB, 3 * MiB)
    listing = subprocess.run(["ls", "-ls", "--block-size=512", str(mnt.mountpoint)], capture_output=True,
                             text=True, check=True).stdout
    assert any(line.split()[0] == str(3 * MiB // 512) for line in listing.splitlines()[1:]), listing
    copy = tmp_path / "copy.raw"
    subprocess.run(["cp", "--sparse=auto", str(mnt.raw("first.raw")), str(copy)], check=True)
    assert copy.stat().st_blocks * 512 < 64 * MiB, "the copy is not sparse"
    mnt.umount()


def test_a_count_made_stale_by_a_write_is_not_kept_for_an_hour(tmp_path, mnt):
    """After a write the kernel forgets the attributes and asks again; the count it then gets may be a
    few seconds old, so it is given with a timeout that ends when a recount is due: stat catches up."""
    image = make_image(tmp_path / "grow.vhdx", 256 * MiB, block_size=MiB)
    mnt.mount(image)
    raw = mnt.raw("grow.raw")
    assert os.stat(raw).st_blocks == 0
    fd = os.open(raw, os.O_RDWR)
    try:
        os.pwrite(fd, os.urandom(2 * MiB), 100 * MiB)
    finally:
        os.close(fd)
    os.stat(raw)  # may still show the count from before the write
    deadline = time.monotonic() + 120  # far beyond ALLOCATION_RECOUNT; the old attr_timeout was 3600 s
    while os.stat(raw).st_blocks * 512 != 2 * MiB and time.monotonic() < deadline:
        time.sleep(0.2)
    assert os.stat(raw).st_blocks * 512 == 2 * MiB
    mnt.umount()


async def test_a_count_made_in_pieces_equals_the_whole_disk_count(tmp_path):
    """The count goes a piece at a time (the loop free between pieces, pieces growing and shrinking with their
    cost): data on both sides of piece edges, in a chain, counts as one whole-disk walk does."""
    from vhdxfs.engine import Kind, create_child
    from vhdxfs.engine.aio import AsyncDisk
    from vhdxfs.mount.allocation import COUNT_FIRST_PIECE, Allocation

    base = make_image(tmp_path / "base.vhdx", 3 * GiB, block_size=MiB)
    async with await AsyncDisk.open(base) as disk:
        for at in (0, COUNT_FIRST_PIECE - 512, 3 * COUNT_FIRST_PIECE + 4096, GiB + 7 * 512):
            await disk.write(at, b"p" * 1536)
    create_child(tmp_path / "child.avhdx", base)
    async with await AsyncDisk.open(tmp_path / "child.avhdx") as disk:
        for at in range(COUNT_FIRST_PIECE - 8 * MiB, 3 * GiB, 37 * MiB + 512):
            await disk.write(at, b"c" * 4096)
        await disk.write(3 * GiB - 512, b"e" * 512)
        whole = sum(e.length for e in await disk.extents() if e.kind == Kind.DATA)
        counted = await Allocation(disk).count()
    assert counted == whole and whole > 0
