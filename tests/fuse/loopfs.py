"""A tiny pyfuse3 file system for testing pyfuse3's request loop as vhdxfs patches it (no VHDX involved).

    python -m tests.fuse.loopfs MOUNTPOINT     (foreground; ends when unmounted)

Files:
  pattern  16 MiB whose byte at offset i is (i * 7 + i // 4096) % 251; every third read first yields to
           trio (trio.sleep(0)), so handlers that finish at once and handlers that wait are mixed
  gate     reading it waits until `key` has been read: it answers only if the loop goes on reading
           requests while a handler waits
  key      reading it opens the gate; 3 bytes "key"
"""

from __future__ import annotations

import errno
import stat
import sys

import pyfuse3
import trio

PATTERN_SIZE = 16 << 20
FILES = {b"pattern": 2, b"gate": 3, b"key": 4}


def pattern(offset: int, length: int) -> bytes:
    return bytes((i * 7 + i // 4096) % 251 for i in range(offset, offset + length))


class LoopFS(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.key_read = trio.Event()
        self.reads = 0

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_size = stat.S_IFDIR | 0o755, 0
        else:
            a.st_mode = stat.S_IFREG | 0o444
            a.st_size = PATTERN_SIZE if inode == 2 else 3
        return a

    async def getattr(self, inode, ctx=None):
        if inode != pyfuse3.ROOT_INODE and inode not in FILES.values():
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent, name, ctx=None):
        if name not in FILES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILES[name])

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):
        self.reads += 1
        if fh == 3:
            await self.key_read.wait()
            return b"open"[off:off + size]
        if fh == 4:
            self.key_read.set()
            return b"key"[off:off + size]
        if self.reads % 3 == 0:
            await trio.sleep(0)
        return pattern(off, max(0, min(size, PATTERN_SIZE - off)))


def main() -> None:
    pyfuse3.init(LoopFS(), sys.argv[1], {"fsname=loopfs"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
