"""RawFilesOperations against an in-memory disk: the request answers the kernel gets, without a mount.

Fast and root-free, so the errno mapping, the size rules and the flush bookkeeping are checked on every
machine; the real mounts in the other files check the same paths end to end.
"""

from __future__ import annotations

import errno
import os
import stat
from types import SimpleNamespace

import pyfuse3
import pytest

from tests.fuse.fakedisk import FakeDisk
from vhdxfs.errors import HostIOError, ImageLockedError
from vhdxfs.mount.command import check_arguments
from vhdxfs.mount.daemon import MountConfig
from vhdxfs.mount.operations import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, RawFilesOperations, raw_name

MiB = 1 << 20
FALLOC_FL_ZERO_RANGE = 0x10
CTX = SimpleNamespace(uid=1000, gid=1000, pid=1, umask=0o022)


def ops_for(*disks: FakeDisk, read_only: bool = False) -> RawFilesOperations:
    return RawFilesOperations(list(disks), read_only=read_only, uid=1234, gid=5678)


def fields(**set_) -> SimpleNamespace:
    names = ("update_size", "update_mode", "update_uid", "update_gid", "update_atime", "update_mtime",
             "update_ctime")
    return SimpleNamespace(**{n: set_.get(n, False) for n in names})


async def errno_of(coro) -> int:
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await coro
    return exc.value.errno


def test_names_follow_the_image_stem():
    assert raw_name("/srv/vm/disk.vhdx") == "disk.raw"
    assert raw_name("snap.avhdx") == "snap.raw"
    assert raw_name("odd.name.vhdx") == "odd.name.raw"


async def test_root_and_files_have_the_promised_attributes():
    ops = ops_for(FakeDisk("/i/a.vhdx", 8 * MiB), FakeDisk("/i/b.avhdx", 3 * MiB + 512))
    root = await ops.getattr(pyfuse3.ROOT_INODE, CTX)
    assert stat.S_ISDIR(root.st_mode) and stat.S_IMODE(root.st_mode) == 0o755
    a = await ops.lookup(pyfuse3.ROOT_INODE, b"a.raw", CTX)
    b = await ops.lookup(pyfuse3.ROOT_INODE, b"b.raw", CTX)
    assert stat.S_ISREG(a.st_mode) and stat.S_IMODE(a.st_mode) == 0o644
    assert (a.st_size, b.st_size) == (8 * MiB, 3 * MiB + 512)
    assert (a.st_uid, a.st_gid) == (1234, 5678)
    assert a.st_ino != b.st_ino
    assert await errno_of(ops.lookup(pyfuse3.ROOT_INODE, b"c.raw", CTX)) == errno.ENOENT
    assert await errno_of(ops.getattr(999, CTX)) == errno.ENOENT
    ro = ops_for(FakeDisk("/i/a.vhdx", MiB, read_only=True), read_only=True)
    attrs = await ro.lookup(pyfuse3.ROOT_INODE, b"a.raw", CTX)
    assert stat.S_IMODE(attrs.st_mode) == 0o444


async def test_truncate_only_to_the_same_size():
    disk = FakeDisk("/i/a.vhdx", 8 * MiB)
    ops = ops_for(disk)
    ino = (await ops.lookup(pyfuse3.ROOT_INODE, b"a.raw", CTX)).st_ino
    same = SimpleNamespace(st_size=8 * MiB)
    assert (await ops.setattr(ino, same, fields(update_size=True), None, CTX)).st_size == 8 * MiB
    for size in (0, 4 * MiB, 9 * MiB):
        attr = SimpleNamespace(st_size=size)
        assert await errno_of(ops.setattr(ino, attr, fields(update_size=True), None, CTX)) == errno.EPERM
    # touch(1) and friends must not fail
    await ops.setattr(ino, SimpleNamespace(), fields(update_mtime=True, update_atime=True), None, CTX)


async def test_reads_stop_at_the_end_and_writes_past_it_fail_like_a_block_device():
    disk = FakeDisk("/i/a.vhdx", 4 * MiB)
    ops = ops_for(disk)
    fh = (await ops.open(2, os.O_RDWR, CTX)).fh
    assert await ops.write(fh, 4 * MiB - 100, b"x" * 300) == 100  # short write at the end
    assert await ops.read(fh, 4 * MiB - 100, MiB) == b"x" * 100  # clamped, no error
    assert await ops.read(fh, 4 * MiB, 4096) == b""
    assert await errno_of(ops.write(fh, 4 * MiB, b"y")) == errno.ENOSPC
    assert await errno_of(ops.open(2, os.O_RDWR | os.O_TRUNC, CTX)) == errno.EPERM
    assert await errno_of(ops.open(pyfuse3.ROOT_INODE, os.O_RDONLY, CTX)) == errno.EISDIR


async def test_read_only_refuses_every_change():
    disk = FakeDisk("/i/a.vhdx", 4 * MiB, read_only=True)
    ops = ops_for(disk, read_only=True)
    for flags in (os.O_WRONLY, os.O_RDWR):
        assert await errno_of(ops.open(2, flags, CTX)) == errno.EROFS
    fh = (await ops.open(2, os.O_RDONLY, CTX)).fh
    assert await errno_of(ops.write(fh, 0, b"x")) == errno.EROFS
    assert await errno_of(ops.fallocate(fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)) == errno.EROFS
    assert not [c for c in disk.calls if c[0] in ("write", "discard")]


async def test_fallocate_modes():
    disk = FakeDisk("/i/a.vhdx", 4 * MiB)
    ops = ops_for(disk)
    disk.data[:] = b"\xff" * len(disk.data)
    fh = (await ops.open(2, os.O_RDWR, CTX)).fh
    await ops.fallocate(fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1000, 5000)
    assert ("discard", 1000, 5000) in disk.calls
    assert disk.data[1000:6000] == bytes(5000) and disk.data[999] == 0xFF and disk.data[6000] == 0xFF
    await ops.fallocate(fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4 * MiB - 10, 100)  # clamped at the end
    assert ("discard", 4 * MiB - 10, 10) in disk.calls
    calls = len(disk.calls)
    await ops.fallocate(fh, 0, 0, 4 * MiB)  # allocation inside the disk: nothing to do
    await ops.fallocate(fh, FALLOC_FL_KEEP_SIZE, 0, 8 * MiB)
    assert len(disk.calls) == calls
    assert await errno_of(ops.fallocate(fh, 0, 0, 8 * MiB)) == errno.EFBIG  # would grow the file
    assert await errno_of(ops.fallocate(fh, FALLOC_FL_ZERO_RANGE, 0, 4096)) == errno.EOPNOTSUPP
    assert await errno_of(ops.fallocate(fh, FALLOC_FL_PUNCH_HOLE, 0, 4096)) == errno.EOPNOTSUPP  # needs KEEP_SIZE


async def test_engine_errors_reach_the_kernel_as_their_errno():
    disk = FakeDisk("/i/a.vhdx", 4 * MiB)
    ops = ops_for(disk)
    fh = (await ops.open(2, os.O_RDWR, CTX)).fh
    disk.fail["write"] = HostIOError("No space left on device", path=disk.path, errno=errno.ENOSPC)
    assert await errno_of(ops.write(fh, 0, b"x" * 4096)) == errno.ENOSPC
    disk.fail["read"] = HostIOError("Input/output error", path=disk.path, errno=errno.EIO)
    assert await errno_of(ops.read(fh, 0, 4096)) == errno.EIO
    disk.fail["flush"] = ImageLockedError("locked", path=disk.path)
    assert await errno_of(ops.fsync(fh, False)) == errno.EBUSY
    disk.fail["read"] = ValueError("a bug in the engine")  # not a VhdxError: EIO, and the loop lives on
    assert await errno_of(ops.read(fh, 0, 4096)) == errno.EIO
    assert await ops.read(fh, 0, 4) == bytes(4)


async def test_close_flushes_only_after_writes_and_a_failed_flush_is_retried():
    disk = FakeDisk("/i/a.vhdx", 4 * MiB)
    ops = ops_for(disk)
    fh = (await ops.open(2, os.O_RDWR, CTX)).fh
    await ops.flush(fh)
    assert ("flush",) not in disk.calls  # a reader's close costs nothing
    await ops.write(fh, 0, b"abc")
    disk.fail["flush"] = HostIOError("Input/output error", path=disk.path, errno=errno.EIO)
    assert await errno_of(ops.flush(fh)) == errno.EIO
    await ops.flush(fh)  # still owed: tried again
    assert disk.calls.count(("flush",)) == 2
    await ops.flush(fh)
    assert disk.calls.count(("flush",)) == 2
    await ops.fsync(fh, True)  # fsync always reaches the disk
    assert disk.calls.count(("flush",)) == 3


async def test_statfs_counts_the_virtual_disks():
    ops = ops_for(FakeDisk("/tmp/a.vhdx", 8 * MiB), FakeDisk("/tmp/b.vhdx", 4 * MiB))
    s = await ops.statfs(CTX)
    assert s.f_blocks * s.f_frsize == 12 * MiB
    assert s.f_bavail <= s.f_blocks and s.f_namemax == 255


def test_mount_arguments_are_checked_before_anything_happens(tmp_path):
    from vhdxfs.errors import VhdxError

    (tmp_path / "x").mkdir()
    for name in ("a.vhdx", "x/a.avhdx", "b.vhdx"):
        (tmp_path / name).write_bytes(b"")
    point = tmp_path / "mnt"
    point.mkdir()
    with pytest.raises(VhdxError, match="both appear as a.raw"):
        check_arguments(MountConfig([str(tmp_path / "a.vhdx"), str(tmp_path / "x/a.avhdx")], str(point)))
    with pytest.raises(VhdxError, match="no such image"):
        check_arguments(MountConfig([str(tmp_path / "none.vhdx")], str(point)))
    with pytest.raises(VhdxError, match="mount point does not exist"):
        check_arguments(MountConfig([str(tmp_path / "b.vhdx")], str(tmp_path / "nowhere")))
    check_arguments(MountConfig([str(tmp_path / "a.vhdx"), str(tmp_path / "b.vhdx")], str(point)))
