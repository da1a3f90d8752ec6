"""pyfuse3 Operations: a root directory holding one regular file, <stem>.raw, per mounted image.

Only request handling lives here; opening images, mounting and shutting down belong to daemon.py, the
answers to errors to answers.py.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from pathlib import Path

import pyfuse3

from ..engine import Kind, S3Location, parse_location
from ..engine.aio import AsyncDisk
from .allocation import ATTR_TIMEOUT, Allocation
from .answers import fuse_error, fuse_errors, trace

log = logging.getLogger("vhdxfs.mount")

SEEK_WINDOW = 4 << 30  # SEEK_DATA / SEEK_HOLE look at the extents this much at a time
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def raw_name(image: str | os.PathLike[str] | S3Location) -> str:
    """disk.vhdx -> disk.raw, snap.avhdx -> snap.raw, s3://bucket/golden.vhdx -> golden.raw"""
    return parse_location(image).stem + ".raw"


class RawFile:
    """One image as a file: its inode, name and disk, and whether it has writes not yet flushed."""

    def __init__(self, inode: int, name: str, disk: AsyncDisk) -> None:
        self.inode = inode
        self.name = name
        self.disk = disk
        self.unflushed = False
        self.allocation = Allocation(disk)  # st_blocks

    async def allocated_bytes(self) -> int:
        """Bytes of the disk that hold data (through the chain), never guessed (allocation.py)."""
        return await self.allocation.count()


class RawFilesOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, disks: list[AsyncDisk], *, read_only: bool, uid: int, gid: int,
                 direct_io: bool = True, names: list[str] | None = None) -> None:
        """``names``: the raw files' names, fixed now from the images as configured (a disk's path moves on
        with checkpoints and merges); by default from the disks' paths."""
        super().__init__()
        self.read_only = read_only
        self.uid, self.gid = uid, gid
        self.direct_io = direct_io
        self.trace = log.isEnabledFor(logging.DEBUG)  # --debug: each read and write is logged
        self.mounted_at = time.time_ns()
        self.files: dict[int, RawFile] = {}
        self.by_name: dict[bytes, RawFile] = {}
        for i, disk in enumerate(disks):
            f = RawFile(pyfuse3.ROOT_INODE + 1 + i, names[i] if names else raw_name(disk.path), disk)
            self.files[f.inode] = f
            self.by_name[f.name.encode()] = f

    # -- names and attributes -----------------------------------------------------------------------------
    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        """The attributes that need no counting; a file's st_blocks is 0 here. Every answer about a file goes
        out through ``_file_attrs`` (getattr, lookup, setattr, readdirplus): the first one is what stat shows."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_atime_ns = a.st_ctime_ns = a.st_mtime_ns = self.mounted_at
        a.attr_timeout = a.entry_timeout = ATTR_TIMEOUT
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
        elif inode in self.files:
            a.st_mode = stat.S_IFREG | (0o444 if self.read_only else 0o644)
            a.st_nlink = 1
            a.st_size = self.files[inode].disk.size
            a.st_blksize = 1 << 20
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return a

    async def _file_attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        """_attrs, with st_blocks counting only the bytes that hold data (the raw file is sparse), kept by the
        kernel no longer than that count is true."""
        attrs = self._attrs(inode)
        f = self.files.get(inode)
        if f is not None:
            attrs.st_blocks = -(-await f.allocated_bytes() // 512)
            attrs.attr_timeout = f.allocation.attr_timeout()
        return attrs

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return await self._file_attrs(inode)

    @fuse_errors  # lookup, setattr and readdir count the allocation: an I/O error answers EIO
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attrs(pyfuse3.ROOT_INODE)
        f = self.by_name.get(name)
        if f is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self._file_attrs(f.inode)

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext | None) -> pyfuse3.EntryAttributes:
        """A size changes only through `vhdxfs resize` (truncate to the size it has is fine: losetup -c,
        QEMU's block_resize); times and modes are accepted and not stored."""
        if fields.update_size:
            f = self.files.get(inode)
            if f is None or attr.st_size != f.disk.size:
                raise pyfuse3.FUSEError(errno.EPERM)
        if (fields.update_uid or fields.update_gid) and ctx is not None and ctx.uid != 0:
            raise pyfuse3.FUSEError(errno.EPERM)
        return await self._file_attrs(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for f in sorted(self.files.values(), key=lambda f: f.inode):
            if f.inode <= start_id:
                continue
            # readdir is readdirplus (pyfuse3 asks for it always): these attributes fill the kernel's cache
            # just as a lookup's do, so an `ls` of the mount point decides what the next stat shows.
            if not pyfuse3.readdir_reply(token, f.name.encode(), await self._file_attrs(f.inode), f.inode):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        bs = 4096
        s.f_bsize = s.f_frsize = bs
        s.f_blocks = sum(f.disk.size for f in self.files.values()) // bs
        local = [f.disk.path for f in self.files.values() if isinstance(f.disk.path, Path)]
        host = os.statvfs(local[0].parent) if local else None
        free = host.f_bavail * host.f_frsize // bs if host else 0
        s.f_bfree = s.f_bavail = min(free, s.f_blocks)
        s.f_files = len(self.files) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- data ---------------------------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode not in self.files:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == pyfuse3.ROOT_INODE else errno.ENOENT)
        if self.read_only and flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EPERM)
        # direct_io: every read and write reaches the engine (no second page cache above the host's),
        # which keeps O_DIRECT users (a VM with cache=none) and buffered users coherent.
        return pyfuse3.FileInfo(fh=inode, direct_io=self.direct_io, keep_cache=False, nonseekable=False)

    # pyfuse3's stub says read returns bytes; its handler takes any contiguous buffer (PyObject_GetBuffer in
    # fuse_read_async), and the engine's reads are bytearrays we need not copy. read and write answer errors
    # as fuse_errors does, written out: they are the hot path.
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:  # type: ignore[override]
        if self.trace:
            trace("read", (fh, off, size))
        try:
            disk = self.files[fh].disk
            end = disk.size
            if off >= end:
                return b""
            n = size if off + size <= end else end - off
            data = disk.read_now(off, n)  # the common case: from the page cache, without a coroutine below us
            return data if data is not None else await disk.read(off, n)
        except Exception as exc:
            raise fuse_error("read", exc) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.trace:
            trace("write", (fh, off, buf))
        try:
            f = self.files[fh]
            disk, end, n = f.disk, f.disk.size, len(buf)
            if self.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            if off >= end:
                raise pyfuse3.FUSEError(errno.ENOSPC)  # like writing past the end of a block device
            if off + n > end:
                n = end - off
                buf = memoryview(buf)[:n]  # type: ignore[assignment]
            if not disk.write_now(off, buf):  # the common case is queued at once, without a coroutine below us
                await disk.write(off, buf)
            f.unflushed = True
            return n
        except Exception as exc:
            raise fuse_error("write", exc) from None

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._flush(self.files[fh])

    @fuse_errors
    async def flush(self, fh: int) -> None:
        """close(2): make what this file wrote durable, so a script may copy the image after closing."""
        f = self.files[fh]
        if f.unflushed:
            await self._flush(f)

    @staticmethod
    async def _flush(f: RawFile) -> None:
        # Cleared before, not after: a write that lands while the flush runs sets it again.
        f.unflushed = False
        try:
            await f.disk.flush()
        except BaseException:
            f.unflushed = True
            raise

    async def release(self, fh: int) -> None:
        return None

    @fuse_errors
    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE from the engine's extents (the kernel answers SEEK_SET/CUR/END itself)."""
        disk = self.files[fh].disk
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if offset < 0 or offset >= disk.size:
            raise pyfuse3.FUSEError(errno.ENXIO)
        pos = offset
        while pos < disk.size:
            for e in await disk.extents(pos, min(SEEK_WINDOW, disk.size - pos)):
                if (e.kind == Kind.DATA) == (whence == os.SEEK_DATA):
                    return max(offset, e.offset)
            pos += min(SEEK_WINDOW, disk.size - pos)
        if whence == os.SEEK_HOLE:
            return disk.size  # the end of a file counts as a hole
        raise pyfuse3.FUSEError(errno.ENXIO)

    @fuse_errors
    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        """PUNCH_HOLE|KEEP_SIZE is discard; plain allocation inside the disk is a no-op (space comes on write)."""
        f = self.files[fh]
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if off < 0 or length <= 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        end = min(off + length, f.disk.size)
        if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            if off < end:
                await f.disk.discard(off, end - off)
                f.unflushed = True
            return
        if mode in (0, FALLOC_FL_KEEP_SIZE):
            if mode == 0 and off + length > f.disk.size:
                raise pyfuse3.FUSEError(errno.EFBIG)
            return
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
