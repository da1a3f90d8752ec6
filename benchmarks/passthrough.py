"""The ceiling of this architecture: a minimal pyfuse3 + trio passthrough serving one raw file.

    python passthrough.py RAWFILE MOUNTPOINT   -> MOUNTPOINT/disk.raw

Same shape and the same host I/O as vhdxfs's mount (direct_io files, vhdxfs's HostFile: page-cache reads
inline with RWF_NOWAIT, the rest in its worker pool) with no translation at all.
"""

from __future__ import annotations

import errno
import stat
import sys

import pyfuse3
import trio

from vhdxfs.engine.hostfile import HostFile


class Passthrough(pyfuse3.Operations):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.host = HostFile(path, writable=True, lock=False)
        self.size = self.host.size()

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_size = stat.S_IFDIR | 0o755, 0
        else:
            a.st_mode, a.st_size = stat.S_IFREG | 0o644, self.size
        return a

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, 2):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent, name, ctx=None):
        if name != b"disk.raw":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(2)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id < 2:
            pyfuse3.readdir_reply(token, b"disk.raw", self._attr(2), 2)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):
        return await self.host.apread(off, min(size, max(0, self.size - off)))

    async def write(self, fh, off, buf):
        await self.host.apwrite(off, buf)
        return len(buf)

    async def fsync(self, fh, datasync):
        await self.host.afdatasync()

    async def flush(self, fh):
        return None

    async def release(self, fh):
        return None


def main() -> None:
    raw, mountpoint = sys.argv[1:3]
    pyfuse3.init(Passthrough(raw), mountpoint, {"fsname=passthrough", "default_permissions"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
