"""AsyncDisk: the engine for trio callers (the FUSE daemon, the NBD server, the library's async form).

The same steps as the synchronous Disk (core.py), driven by ``drive``: each operation a step yields is
awaited on the layer's AsyncHost (host.py). Opening (parsing, log replay, finding parents) is blocking
work and runs in a worker thread. Concurrent calls are fine: steps take the engine's locks (allocation,
commit) as trio locks, and translation needs none.
"""

from __future__ import annotations

import functools
import logging
import os
import uuid

import trio

from ..disk.core import DiskCore
from ..disk.steps import Step
from ..disk.sync import DiskFacts
from ..disk.translate import Extent
from ..image.host import HostFactory, PosixFile
from .asynchost import AsyncHost

log = logging.getLogger("vhdxfs")


async def drive(step: Step):
    """Run ``step`` to its end, awaiting each operation it yields; errors are thrown back into it."""
    try:
        op = step.send(None)
        while True:
            try:
                result = await op[0](*op[1:])
            except BaseException as exc:  # thrown back so the step's own clean-up (locks) runs
                op = step.throw(exc)
            else:
                op = step.send(result)
    except StopIteration as stop:
        return stop.value


class AsyncDisk(DiskFacts):
    """One image (and its parents), for trio; create with ``await AsyncDisk.open(path)``."""

    def __init__(self, core: DiskCore) -> None:
        core.attach(AsyncHost)
        self._core = core
        self._closed = False

    @classmethod
    async def open(cls, path: str | os.PathLike, *, read_only: bool = False,
                   parent: str | os.PathLike | None = None, host_factory: HostFactory = PosixFile,
                   data_write_guid: uuid.UUID | None = None) -> AsyncDisk:
        """As Disk.open (engine/disk.py), with the blocking work in a worker thread."""
        core = await trio.to_thread.run_sync(functools.partial(
            DiskCore.open, path, read_only=read_only, parent=parent, host_factory=host_factory,
            data_write_guid=data_write_guid))
        return cls(core)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        core = self._core
        where = core.locate(offset, length)
        if where >= 0:  # the common case, without the step machinery: same lookup, same host read
            buf = bytearray(length)
            block = where - offset % core.block_size  # the block's file space stays ours until the read ends
            core.committer.hold(block)
            try:
                await core.io.pread_into(where, memoryview(buf))
            finally:
                core.committer.let_go(block)
            return buf
        return await drive(core.read(offset, length))

    def read_now(self, offset: int, length: int) -> bytes | bytearray | None:
        """The bytes of [offset, offset+length) when they can be had without waiting at all (one present
        block whose bytes the host's page cache holds), else None: then ``read``. For front ends that serve
        a request in the task that received it when they can (the NBD server)."""
        core = self._core
        where = core.locate(offset, length)
        return core.io.read_now(where, length) if where >= 0 else None

    def write_now(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Queue the write if it needs no wait at all (one present block, room in the write-back queue), and
        say so; False: nothing was done, use ``write``. Acknowledged like ``write`` (durable after a flush)."""
        core = self._core
        where = core.write_target(offset, len(data))
        return where >= 0 and core.io.write_now(where, data)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Acknowledged once queued; durable after the next flush (README, "Durability")."""
        if not self.write_now(offset, data):  # the common case: queued at once, without the step machinery
            await drive(self._core.write(offset, data))

    async def discard(self, offset: int, length: int) -> None:
        """The range reads as zeros (never as a parent's data); whole blocks give their space back."""
        await drive(self._core.write_zeroes(offset, length, True))

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        await drive(self._core.write_zeroes(offset, length, unmap))

    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        if length is None:
            length = self.size - offset
        return await drive(self._core.extents(offset, length))

    async def flush(self) -> None:
        await drive(self._core.flush())

    async def close(self) -> None:
        """Flush, apply the log, clear LogGuid (a clean image), release the locks."""
        if self._closed:
            return
        self._closed = True
        await drive(self._core.close())

    async def __aenter__(self) -> AsyncDisk:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def open_disks(paths: list[str], *, read_only: bool = False,
                     parent: str | os.PathLike | None = None) -> list[AsyncDisk]:
    """Open every image (a daemon serves several); if one fails, the ones opened are closed again."""
    disks: list[AsyncDisk] = []
    try:
        for path in paths:
            disks.append(await AsyncDisk.open(path, read_only=read_only, parent=parent))
    except BaseException:
        with trio.CancelScope(shield=True):
            await close_disks(disks)
        raise
    return disks


async def close_disks(disks: list[AsyncDisk]) -> None:
    """Close each image cleanly; one failing to close does not keep the others from closing."""
    for disk in disks:
        try:
            await disk.close()
            log.info("%s: closed cleanly", disk.path)
        except Exception as exc:
            log.error("%s: could not close cleanly: %s", disk.path, exc)
