"""An in-memory stand-in for AsyncDisk with the same interface, for testing Operations without a mount.

It checks what the real engine checks (ranges, read-only) and records the calls the mount layer makes, so
tests can see that a discard or a flush reached the disk, and can make any call fail on purpose.
"""

from __future__ import annotations

from pathlib import Path

import trio

from vhdxfs.errors import OutOfRangeError, ReadOnlyError, VhdxError


class FakeDisk:
    def __init__(self, path: str, size: int, *, read_only: bool = False, block_size: int = 1 << 20) -> None:
        self.path = Path(path)
        self.size = size
        self.read_only = read_only
        self.logical_sector_size = 512
        self.physical_sector_size = 4096
        self.block_size = block_size
        self.data = bytearray(size)
        self.calls: list[tuple] = []
        self.fail: dict[str, BaseException] = {}  # method name -> exception to raise once
        self.closed = False

    @classmethod
    async def open(cls, path: str, *, read_only: bool = False, parent: str | None = None) -> FakeDisk:
        return cls(path, 16 << 20, read_only=read_only)

    def _enter(self, name: str, *args: object) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail.pop(name)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(f"{offset}+{length} beyond {self.size}", path=self.path)

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("image is open read-only", path=self.path)

    async def read(self, offset: int, length: int) -> bytes:
        self._enter("read", offset, length)
        self._check(offset, length)
        await trio.lowlevel.checkpoint()
        return bytes(self.data[offset:offset + length])

    def read_now(self, offset: int, length: int) -> None:
        """Nothing is had without waiting here: the mount always takes ``read`` (recorded, failable)."""
        return None

    def write_now(self, offset: int, data: bytes | memoryview) -> bool:
        """Likewise: the mount always takes ``write``."""
        return False

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        self._enter("write", offset, len(data))
        self._writable()
        self._check(offset, len(data))
        await trio.lowlevel.checkpoint()
        self.data[offset:offset + len(data)] = data

    async def discard(self, offset: int, length: int) -> None:
        self._enter("discard", offset, length)
        self._writable()
        self._check(offset, length)
        await trio.lowlevel.checkpoint()
        self.data[offset:offset + length] = bytes(length)

    async def flush(self) -> None:
        self._enter("flush")
        await trio.lowlevel.checkpoint()

    async def close(self) -> None:
        self._enter("close")
        if self.closed:
            raise VhdxError("closed twice", path=self.path)
        self.closed = True

    async def extents(self, offset: int = 0, length: int | None = None) -> list:
        """Data where the bytes are not zero, holes elsewhere, at 64 KiB grain (what lseek and st_blocks use)."""
        from vhdxfs.engine import Extent, Kind

        end = self.size if length is None else offset + length
        out: list = []
        for start in range(offset, end, 65536):
            n = min(65536, end - start)
            kind = Kind.DATA if any(self.data[start:start + n]) else Kind.HOLE
            if out and out[-1].kind == kind:
                out[-1] = out[-1]._replace(length=out[-1].length + n)
            else:
                out.append(Extent(start, n, kind, self.path, 0))
        return out
