"""AsyncDisk: the engine for trio callers (the FUSE daemon, the NBD server, the library's async form).

The driver of the core's contract (disk/core.py) for trio: it takes a plan, moves its bytes through each
layer's AsyncHost (asynchost.py: reads inline from the page cache or in a worker thread, writes into the
write-back queue), completes the plan. Steps (a bitmap to load, a block to allocate, flush, close) are
driven by ``drive``. Opening (parsing, log replay, finding parents) is blocking work and runs in a worker
thread. Concurrent calls are fine: steps take the engine's locks (allocation, flush) as trio locks, and
planning never waits.
"""

from __future__ import annotations

import functools
import logging
import os
import uuid
from typing import TypeVar

import trio

from ..disk.chain import open_chain
from ..disk.core import DiskCore
from ..disk.runs import Extent, Kind
from ..disk.steps import Step
from ..disk.sync import DiskFacts, widened, zero_pieces
from ..image.host import HostFactory, PosixFile
from .asynchost import AsyncHost

log = logging.getLogger("vhdxfs")
T = TypeVar("T")
_DATA = Kind.DATA


async def drive(step: Step[T]) -> T:
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
        value: T = stop.value
        return value


class AsyncDisk(DiskFacts):
    """One image (and its parents), for trio; create with ``await AsyncDisk.open(path)``."""

    def __init__(self, core: DiskCore, *, writeback_limit: int | None = None) -> None:
        self._hosts = [AsyncHost(layer.image.host, writeback_limit=writeback_limit) for layer in core.layers()]
        core.attach(self._hosts)
        self._core = core
        self._closed = False

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, read_only: bool = False,
                   parent: str | os.PathLike[str] | None = None, host_factory: HostFactory = PosixFile,
                   data_write_guid: uuid.UUID | None = None, writeback_limit: int | None = None) -> AsyncDisk:
        """As Disk.open (engine/disk/sync.py), with the blocking work in a worker thread.
        ``writeback_limit``: bytes of acknowledged writes that may wait for the image file (default 16 MiB;
        docs/mounting.md, "The raw file", its Durability rule)."""
        core = await trio.to_thread.run_sync(functools.partial(
            open_chain, path, read_only=read_only, parent=parent, host_factory=host_factory,
            data_write_guid=data_write_guid))
        return cls(core, writeback_limit=writeback_limit)

    # -- reads --------------------------------------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytearray:
        core = self._core
        plan = core.plan_read(offset, length)
        if plan is None:
            plan = await drive(core.prepare_read(offset, length))
        buf = bytearray(length)
        view = memoryview(buf)
        try:
            for run in plan.runs:
                if run.kind == _DATA:
                    start = run.offset - offset
                    part = view if run.length == length else view[start:start + run.length]
                    await self._hosts[run.depth].pread_into(run.file_offset, part)
        except BaseException:
            plan.release()
            raise
        plan.complete(buf)
        return buf

    def read_now(self, offset: int, length: int) -> bytearray | None:
        """The bytes of [offset, offset+length) when they can be had without waiting at all (zeros, or one
        run whose bytes the host's page cache holds), else None: then ``read``. For front ends that serve a
        request in the task that received it when they can (the NBD server)."""
        plan = self._core.plan_read(offset, length)
        if plan is None:
            return None
        runs = plan.runs
        data: bytearray | None = None
        if len(runs) == 1 and runs[0].kind == _DATA:
            data = self._hosts[runs[0].depth].read_now(runs[0].file_offset, length)
        elif all(run.kind != _DATA for run in runs):
            data = bytearray(length)
        if data is None:
            plan.release()
        else:
            plan.complete(data)
        return data

    # -- writes -------------------------------------------------------------------------------------------
    def write_now(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Queue the write if it needs no wait at all (nothing to allocate, room in the write-back queue), and
        say so; False: nothing was done, use ``write``. Acknowledged like ``write`` (durable after a flush)."""
        plan = self._core.plan_write(offset, len(data))
        if plan is None:
            return False
        runs = plan.runs
        if len(runs) == 1 and self._hosts[0].write_now(runs[0].file_offset, data):
            plan.complete()  # queued: its guard ends here (disk/guards.py)
            return True
        plan.release()
        return False

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Acknowledged once queued; durable after the next flush (docs/mounting.md, "The raw file", its
        Durability rule)."""
        core = self._core
        view = memoryview(data).cast("B")
        plan = core.plan_write(offset, len(view)) if view else None
        if plan is None:
            if not view:
                core.plan_write(offset, 0)  # read-only and range checks only
                return
            start, end = core.sector_span(offset, len(view))
            if (start, end) != (offset, offset + len(view)):
                lss = core.geometry.logical_sector_size
                view = widened(offset, view, start, end, await self.read(start, lss), await self.read(end - lss, lss))
                offset = start
            plan = await drive(core.prepare_write(offset, len(view)))
        host = self._hosts[0]
        try:
            for run in plan.runs:
                start = run.offset - offset
                part = view if run.length == len(view) else view[start:start + run.length]
                if not host.write_now(run.file_offset, part):
                    await host.pwrite(run.file_offset, part)
        except BaseException:
            plan.release()
            raise
        plan.complete()  # queued: its guard ends here (disk/guards.py)

    async def discard(self, offset: int, length: int) -> None:
        """The range reads as zeros (never as a parent's data); whole blocks give their space back."""
        await self.write_zeroes(offset, length, unmap=True)

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        cover = await drive(self._core.write_zeroes(offset, length, unmap))
        for pos, n in zero_pieces(cover):
            await self.write(pos, bytes(n))

    # -- the rest -----------------------------------------------------------------------------------------
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

    async def abandon(self) -> None:
        """Stop as a crash would: the queued writes reach the files, nothing is flushed, no log is applied,
        the files are closed (their locks go with them). A test seam for crash tests (tests/torture)."""
        if self._closed:
            return
        self._closed = True

        def stop() -> None:
            for host in self._hosts:
                host.stop_writeback()
            self._core.close_files()

        await trio.to_thread.run_sync(stop)

    async def __aenter__(self) -> AsyncDisk:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def open_disks(paths: list[str], *, read_only: bool = False,
                     parent: str | os.PathLike[str] | None = None) -> list[AsyncDisk]:
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
