"""The ceiling of this architecture: a minimal pyfuse3 + trio passthrough serving one raw file.

    python passthrough.py [--io hostfile|threads] RAWFILE MOUNTPOINT   -> MOUNTPOINT/disk.raw

It has the shape of vhdxfs's mount (one direct_io file, the same FUSE options) and does no translation at
all, so the gap between it and vhdxfs is what the VHDX engine costs. Two ways to reach the host file:

  hostfile  (default) vhdxfs's own host I/O (engine/aio/asynchost.py): page-cache reads inline with RWF_NOWAIT,
            writes queued for the write-back thread, everything else in its lean worker pool. The fair
            ceiling: the same host I/O as vhdxfs, translation excluded.
  threads   plain blocking os.pread/os.pwrite/os.fdatasync in trio.to_thread.run_sync workers. Needs
            nothing from vhdxfs; shows what the generic trio thread hand-off costs per request.

Runs in the foreground until unmounted (fusermount3 -u MOUNTPOINT) or sent SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat

import pyfuse3
import trio

INODE = 2  # the one file; pyfuse3.ROOT_INODE (1) is the directory
NAME = b"disk.raw"


class ThreadIO:
    """Blocking syscalls on a raw file, each handed to a trio worker thread."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    async def apread(self, off: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(os.pread, self.fd, size, off)

    async def apwrite(self, off: int, buf: bytes) -> None:
        done = 0
        view = memoryview(buf)
        while done < len(buf):  # pwrite may be short
            done += await trio.to_thread.run_sync(os.pwrite, self.fd, view[done:], off + done)

    async def afdatasync(self) -> None:
        await trio.to_thread.run_sync(os.fdatasync, self.fd)

    def close(self) -> None:
        os.close(self.fd)


class EngineIO:
    """vhdxfs's own host I/O, as the daemon's engine uses it (engine/aio/asynchost.py): page-cache reads inline
    with RWF_NOWAIT, writes through the write-back queue, everything else in worker threads."""

    def __init__(self, path: str) -> None:
        from vhdxfs.engine import PosixFile  # needs the repo on PYTHONPATH (the harness sets it)
        from vhdxfs.engine.aio import AsyncHost

        self.file = PosixFile(path, writable=True, lock=False)
        self.aio = AsyncHost(self.file)

    def size(self) -> int:
        return self.file.size()

    async def apread(self, off: int, size: int) -> bytearray:
        return await self.aio.pread(off, size)

    async def apwrite(self, off: int, buf: bytes) -> None:
        await self.aio.pwrite(off, buf)

    async def afdatasync(self) -> None:
        await self.aio.fdatasync()

    def close(self) -> None:
        if self.aio.writeback is not None:
            self.aio.writeback.close()
        self.file.close()


def open_host(path: str, io: str):
    return ThreadIO(path) if io == "threads" else EngineIO(path)


class Passthrough(pyfuse3.Operations):
    def __init__(self, host) -> None:
        super().__init__()
        self.host = host
        self.size = host.size()

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_nlink = 2 if inode == pyfuse3.ROOT_INODE else 1
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_size = stat.S_IFDIR | 0o755, 0
        else:
            a.st_mode, a.st_size = stat.S_IFREG | 0o644, self.size
            a.st_blksize = 4096
            a.st_blocks = (self.size + 511) // 512
        return a

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent, name, ctx=None):
        if parent != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(INODE)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id < 1:
            pyfuse3.readdir_reply(token, NAME, self._attr(INODE), 1)

    async def open(self, inode, flags, ctx):
        if inode != INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        # direct_io, as vhdxfs: every read and write reaches us, no page cache above the host's.
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def read(self, fh, off, size):
        return await self.host.apread(off, min(size, max(0, self.size - off)))

    async def write(self, fh, off, buf):
        if off + len(buf) > self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)  # a disk does not grow
        await self.host.apwrite(off, buf)
        return len(buf)

    async def fsync(self, fh, datasync):
        await self.host.afdatasync()

    async def flush(self, fh):
        return None

    async def release(self, fh):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--io", choices=("hostfile", "threads"), default="hostfile", help="host I/O (see above)")
    ap.add_argument("raw", metavar="RAWFILE")
    ap.add_argument("mountpoint", metavar="MOUNTPOINT")
    args = ap.parse_args()
    ops = Passthrough(open_host(args.raw, args.io))
    # The options vhdxfs's daemon passes (vhdxfs/mount/daemon.py: fuse_options). pyfuse3 3.5 sets
    # max_write itself from libfuse's default (the kernel's max, 1 MiB with max_pages), as for vhdxfs.
    pyfuse3.init(ops, args.mountpoint, {"fsname=passthrough", "subtype=passthrough", "default_permissions"})

    async def serve() -> None:
        async with trio.open_nursery() as nursery:

            async def fuse_loop() -> None:
                await pyfuse3.main()  # returns once the file system is unmounted
                nursery.cancel_scope.cancel()

            nursery.start_soon(fuse_loop)
            # SIGTERM/SIGINT end the loop; the finally below unmounts.
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
