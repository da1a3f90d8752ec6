"""``vhdxfs.open_async``: the virtual disk as an async file for trio code (the AsyncDisk the daemons use).

The methods are those of a trio file (trio.open_file): ``await read(n)``, ``await write(data)``,
``await seek(offset, whence)``, ``await tell()``, ``await flush()``, ``await aclose()``, and ``async with``;
plus ``extents`` and ``discard``. Reads and writes run the engine's steps on the trio thread, the disk's
I/O in worker threads, so the event loop never waits on the disk. One task at a time per file object for
the position (as trio's files): tasks that share one should each use their own offsets via ``pread``
and ``pwrite``.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from ..engine import Extent
from ..engine.aio import AsyncDisk
from ..errors import UsageError
from .file import MODES

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


class AsyncDiskFile:
    def __init__(self, disk: AsyncDisk, mode: str) -> None:
        self._disk = disk
        self.mode = mode
        self._pos = 0
        self.closed = False

    @property
    def name(self) -> str:
        return str(self._disk.path)

    @property
    def size(self) -> int:
        return self._disk.size

    async def read(self, size: int = -1) -> bytes:
        n = self.size - self._pos if size is None or size < 0 else min(size, max(0, self.size - self._pos))
        data = await self.pread(self._pos, n)
        self._pos += len(data)
        return data

    async def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end of the disk), the position untouched."""
        length = max(0, min(length, self.size - offset))
        return bytes(await self._disk.read(offset, length)) if length else b""

    async def write(self, data: ReadableBuffer) -> int:
        n = await self.pwrite(self._pos, data)
        self._pos += n
        return n

    async def pwrite(self, offset: int, data: ReadableBuffer) -> int:
        view = memoryview(data).cast("B")
        if view and offset >= self.size:
            raise OSError(errno.ENOSPC, "write past the end of the virtual disk", self.name)
        n = min(len(view), self.size - offset)
        if n:
            await self._disk.write(offset, view[:n])
        return n

    async def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}.get(whence)
        if base is None or base + offset < 0:
            raise OSError(errno.EINVAL, "invalid seek", self.name)
        self._pos = base + offset
        return self._pos

    async def tell(self) -> int:
        return self._pos

    async def flush(self) -> None:
        if not self._disk.read_only:
            await self._disk.flush()

    async def discard(self, offset: int, length: int) -> None:
        await self._disk.discard(offset, length)

    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        return await self._disk.extents(offset, length)

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            await self._disk.close()

    async def __aenter__(self) -> AsyncDiskFile:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def open_async(path: str | os.PathLike[str], mode: str = "rb", *,
                     parent: str | os.PathLike[str] | None = None) -> AsyncDiskFile:
    """As ``vhdxfs.open``, for trio: ``async with await vhdxfs.open_async("disk.vhdx", "r+b") as disk:``."""
    read_only = MODES.get(mode)
    if read_only is None:
        raise UsageError(f"mode {mode!r}: use 'rb' or 'r+b'", path=path, field="mode")
    return AsyncDiskFile(await AsyncDisk.open(path, read_only=read_only, parent=parent), mode)
