"""AsyncDisk: the engine for trio callers (the FUSE daemon, the NBD server, the library's async form).

The driver of the core's contract (disk/core.py) for trio: it takes a plan, moves its bytes through each
layer's AsyncHost (asynchost.py: reads inline from the page cache or in a worker thread, writes into the
write-back queue), completes the plan. Steps (a bitmap to load, a block to allocate, flush, close) run in
``drive``. Opening (parsing, log replay, finding parents) is blocking work and runs in a worker thread.
Concurrent calls are fine: steps take the engine's locks (allocation, flush) as trio locks, and planning
never waits. Every request passes the gate (gate.py), which a live operation (engine/live/) closes while it
changes the chain, and is counted (stats.py). The live operations' seam: ``core``, ``paused``, ``rebind``,
``host_of``, ``read_layer``/``write_layer`` (one layer's bytes), ``on_change`` and ``defer_flush``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import Callable
from time import perf_counter_ns

import trio

from ..disk.chain import open_chain
from ..disk.core import DiskCore
from ..disk.runs import Extent, Kind
from ..disk.sync import DiskFacts, widened, zero_pieces
from ..image.host import HostFactory
from ..image.locations import S3Location
from ..image.posix import PosixFile
from .asynchost import AsyncHost
from .drive import drive
from .gate import Gate
from .stats import IOStats

_DATA = Kind.DATA


class AsyncDisk(DiskFacts):
    """One image (and its parents), for trio; create with ``await AsyncDisk.open(path)``."""

    def __init__(self, core: DiskCore, *, writeback_limit: int | None = None) -> None:
        self._writeback_limit = writeback_limit
        self._hosts: list[AsyncHost] = []
        self._core = core
        self.rebind(core)
        self._closed = False
        self.gate = Gate()
        self.stats = IOStats()
        # Called with (offset, length) after each write, write-zeroes or discard: a live merge of the top
        # copies again what changed meanwhile (engine/live/merge.py).
        self.on_change: Callable[[int, int], None] | None = None
        self._deferred: list[DiskCore] = []  # layers a flush must flush first (defer_flush)

    @classmethod
    async def open(cls, path: str | os.PathLike[str] | S3Location, *, read_only: bool = False,
                   parent: str | os.PathLike[str] | S3Location | None = None, host_factory: HostFactory = PosixFile,
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
        gate = self.gate
        if gate.shut:
            await gate.enter()
        else:
            gate.inside += 1
        started = perf_counter_ns()
        try:
            buf = await self.read_layer(self._core, offset, length)
        except BaseException:
            self.stats.read.failures += 1
            raise
        finally:
            gate.leave()
        self.stats.read.add(length, perf_counter_ns() - started)
        return buf

    async def read_layer(self, layer: DiskCore, offset: int, length: int) -> bytearray:
        """The bytes of [offset, offset+length) as ``layer`` of this chain shows them (with its parents)."""
        plan = layer.plan_read(offset, length)
        if plan is None:
            plan = await drive(layer.prepare_read(offset, length))
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
        request in the task that received it when they can (the FUSE mount, the NBD server)."""
        if self.gate.shut:
            return None
        started = perf_counter_ns()
        at = self._core.locate(offset, length)  # most requests: no plan, the bytes are read before we return
        data = self._hosts[at[0]].read_now(at[1], length) if at is not None else self._planned_now(offset, length)
        if data is not None:
            self.stats.read.add(length, perf_counter_ns() - started)
        return data

    def _planned_now(self, offset: int, length: int) -> bytearray | None:
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
            return None
        plan.complete(data)
        return data

    # -- writes -------------------------------------------------------------------------------------------
    def write_now(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Queue the write if it needs no wait at all (nothing to allocate, room in the write-back queue), and
        say so; False: nothing was done, use ``write``. Acknowledged like ``write`` (durable after a flush)."""
        if self.gate.shut:
            return False
        started = perf_counter_ns()
        n = len(data)
        at = self._core.locate_write(offset, n)  # most requests: no plan, the bytes are queued before we return
        if at is None:
            plan = self._core.plan_write(offset, n)
            if plan is None or len(plan.runs) != 1 or not self._hosts[0].write_now(plan.runs[0].file_offset, data):
                if plan is not None:
                    plan.release()
                return False
            plan.complete()  # queued: its guard ends here (disk/guards.py)
        else:
            queue = self._hosts[0].writeback  # AsyncHost.write_now, written out: on every write's path
            if queue is None or not queue.write_now(at, data):
                return False
        self.stats.write.add(n, perf_counter_ns() - started)
        if self.on_change is not None:
            self.on_change(offset, n)
        return True

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Acknowledged once queued; durable after the next flush (docs/mounting.md, "The raw file", its
        Durability rule)."""
        gate = self.gate
        if gate.shut:
            await gate.enter()
        else:
            gate.inside += 1
        started = perf_counter_ns()
        view = memoryview(data).cast("B")
        try:
            await self.write_layer(self._core, offset, view)
        except BaseException:
            self.stats.write.failures += 1
            raise
        finally:
            gate.leave()
        self.stats.write.add(len(view), perf_counter_ns() - started)
        if self.on_change is not None:
            self.on_change(offset, len(view))

    async def write_layer(self, layer: DiskCore, offset: int, view: memoryview) -> None:
        """Write into ``layer`` of this chain (the top for a request; the target of a live merge)."""
        plan = layer.plan_write(offset, len(view)) if view else None
        if plan is None:
            if not view:
                layer.plan_write(offset, 0)  # read-only and range checks only
                return
            start, end = layer.sector_span(offset, len(view))
            if (start, end) != (offset, offset + len(view)):
                lss = layer.geometry.logical_sector_size
                view = widened(offset, view, start, end, await self.read_layer(layer, start, lss),
                               await self.read_layer(layer, end - lss, lss))
                offset = start
            plan = await drive(layer.prepare_write(offset, len(view)))
        host = self._hosts[layer.depth]
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
        async with self.gate.counted(self.stats.zero, length):
            await self.zero_layer(self._core, offset, length, unmap)
        if self.on_change is not None:
            self.on_change(offset, length)

    async def zero_layer(self, layer: DiskCore, offset: int, length: int, unmap: bool) -> None:
        """``write_zeroes`` into ``layer`` of this chain."""
        cover = await drive(layer.write_zeroes(offset, length, unmap))
        for pos, n in zero_pieces(cover):
            await self.write_layer(layer, pos, memoryview(bytes(n)))

    # -- the rest -----------------------------------------------------------------------------------------
    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        if length is None:
            length = self.size - offset
        await self.gate.enter()
        try:
            return await drive(self._core.extents(offset, length))
        finally:
            self.gate.leave()

    async def flush(self) -> None:
        async with self.gate.counted(self.stats.flush, 0):
            if self._deferred:
                await self.flush_deferred()
            await drive(self._core.flush())

    async def flush_deferred(self) -> None:
        """Flush the layers ``defer_flush`` named, each until one flush of it succeeds."""
        for layer in list(self._deferred):
            await drive(layer.flusher.flush())
            if layer in self._deferred:
                self._deferred.remove(layer)

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

    # -- the live operations' seam (engine/live/) ---------------------------------------------------------
    @property
    def core(self) -> DiskCore:
        """The top layer of the chain (``core.layers()`` are all of them)."""
        return self._core

    def paused(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold new requests and wait for the ones running to finish; they go on when this exits."""
        return self.gate.closed()

    def rebind(self, core: DiskCore) -> None:
        """Serve the chain whose top is ``core`` from now on (call while paused, or before serving): layers
        kept from the old chain keep their AsyncHost, new ones get one."""
        known = {id(host.host): host for host in self._hosts}
        self._hosts = [known.get(id(layer.image.host)) or AsyncHost(layer.image.host,
                                                                    writeback_limit=self._writeback_limit)
                       for layer in core.layers()]
        core.attach(self._hosts)
        self._core = core

    def defer_flush(self, layer: DiskCore) -> None:
        """``layer`` left the top with writes no flush covered: flushes flush it first until one succeeds (a
        checkpoint's switch waits for none of the old top's data: engine/live/checkpoint.py)."""
        if layer not in self._deferred:
            self._deferred.append(layer)

    def host_of(self, layer: DiskCore) -> AsyncHost:
        return self._hosts[layer.depth]
