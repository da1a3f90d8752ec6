"""Disk: a virtual disk for synchronous callers (the offline tools, the Python library), without trio.

The driver of the core's contract (core.py) in the calling thread: it takes a plan, moves its bytes with
direct calls to the HostIO, completes the plan; steps run with ``run_sync``. Thread-safe: one operation
runs at a time (a lock around each call). The daemon uses AsyncDisk (aio/asyncdisk.py), the same
contract driven by trio.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from typing import TypeVar

from ...errors import Reason, VhdxError
from ..image.host import HostFactory, HostIO
from ..image.locations import Location, S3Location
from ..image.posix import PosixFile
from .chain import open_chain
from .core import DiskCore
from .runs import Extent, Kind
from .steps import Step, SyncIO, run_sync

T = TypeVar("T")
ZERO_CHUNK = 4 << 20  # zeros written to cover a parent are written this much at a time


class DiskFacts:
    """What a disk is, the same for Disk and AsyncDisk (both keep their DiskCore in ``_core``)."""

    _core: DiskCore
    _closed: bool

    @property
    def path(self) -> Location:
        """The image: a local path, or an object in a store (S3Location)."""
        return self._core.path

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        return self._core.size

    @property
    def block_size(self) -> int:
        return self._core.block_size

    @property
    def logical_sector_size(self) -> int:
        return self._core.geometry.logical_sector_size

    @property
    def read_only(self) -> bool:
        return self._core.read_only

    @property
    def fixed(self) -> bool:
        """A fixed image keeps every block allocated (LeaveBlockAllocated)."""
        return self._core.fixed

    @property
    def closed(self) -> bool:
        return self._closed

    def chain(self) -> list[Location]:
        """This image and its parents, child first."""
        return [layer.path for layer in self._core.layers()]


def widened(offset: int, data: memoryview, start: int, end: int, head: bytes | bytearray,
            tail: bytes | bytearray) -> memoryview:
    """``data`` at ``offset`` inside [start, end), whose first and last sector (``head``, ``tail``) hold the
    disk's current bytes: the write a differencing image takes (core.py, ``sector_span``)."""
    buf = bytearray(end - start)
    buf[:len(head)] = head
    buf[-len(tail):] = tail
    buf[offset - start:offset - start + len(data)] = data
    return memoryview(buf)


def zero_pieces(cover: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges ``write_zeroes`` left to write, in pieces of at most ZERO_CHUNK that end on its multiples
    (so every piece but a range's first starts on a sector)."""
    out = []
    for start, n in cover:
        pos, end = start, start + n
        while pos < end:
            stop = min(end, (pos // ZERO_CHUNK + 1) * ZERO_CHUNK)
            out.append((pos, stop - pos))
            pos = stop
    return out


class Disk(DiskFacts):
    """One image (and its parents) opened for reading, or reading and writing; use as a context manager."""

    def __init__(self, core: DiskCore) -> None:
        self._hosts: list[HostIO] = [layer.image.host for layer in core.layers()]
        core.attach([SyncIO(host) for host in self._hosts])
        self._core = core
        self._lock = threading.RLock()
        self._closed = False

    @classmethod
    def open(cls, path: str | os.PathLike[str] | S3Location, *, read_only: bool = False,
             parent: str | os.PathLike[str] | S3Location | None = None, host_factory: HostFactory = PosixFile,
             data_write_guid: uuid.UUID | None = None) -> Disk:
        """Open ``path``; a differencing image finds its parents (``parent`` overrides the nearest one's
        locator). Writable opens take the image's exclusive lock, read-only ones a shared lock; a dirty
        log is replayed (in memory when read-only). ``data_write_guid``: the DataWriteGuid the first
        write sets instead of a random one (commit, spec note 12)."""
        return cls(open_chain(path, read_only=read_only, parent=parent, host_factory=host_factory,
                              data_write_guid=data_write_guid))

    # -- I/O ----------------------------------------------------------------------------------------------
    def _locked(self, fn: Callable[..., T], *args: object) -> T:
        with self._lock:
            if self._closed:
                raise VhdxError("image is closed", path=self.path, reason=Reason.CLOSED)
            return fn(*args)

    def _step(self, step: Step[T]) -> T:
        with self._lock:
            if self._closed:
                raise VhdxError("image is closed", path=self.path, reason=Reason.CLOSED)
            return run_sync(step)

    def read(self, offset: int, length: int) -> bytearray:
        """The bytes of [offset, offset+length); the range must lie inside the disk."""
        return self._locked(self._read, offset, length)

    def _read(self, offset: int, length: int) -> bytearray:
        core = self._core
        plan = core.plan_read(offset, length) or run_sync(core.prepare_read(offset, length))
        buf = bytearray(length)
        view = memoryview(buf)
        try:
            for run in plan.runs:
                if run.kind == Kind.DATA:
                    start = run.offset - offset
                    self._hosts[run.depth].pread_into(run.file_offset, view[start:start + run.length])
        except BaseException:
            plan.release()
            raise
        plan.complete(buf)
        return buf

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (any alignment); durable after the next flush."""
        self._locked(self._write, offset, memoryview(data).cast("B"))

    def _write(self, offset: int, view: memoryview) -> None:
        core = self._core
        plan = core.plan_write(offset, len(view)) if view else None
        if plan is None:
            if not view:
                core.plan_write(offset, 0)  # read-only and range checks only
                return
            start, end = core.sector_span(offset, len(view))
            if (start, end) != (offset, offset + len(view)):
                lss = core.geometry.logical_sector_size
                view = widened(offset, view, start, end, self._read(start, lss), self._read(end - lss, lss))
                offset = start
            plan = run_sync(core.prepare_write(offset, len(view)))
        host = self._hosts[0]
        try:
            for run in plan.runs:
                start = run.offset - offset
                host.pwrite(run.file_offset, view[start:start + run.length])
        except BaseException:
            plan.release()
            raise
        plan.complete()

    def discard(self, offset: int, length: int) -> None:
        """The range reads as zeros (never as a parent's data); whole blocks give their space back."""
        self.write_zeroes(offset, length, unmap=True)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """The range reads as zeros; with ``unmap`` whole blocks are unmapped as by discard."""
        self._locked(self._write_zeroes, offset, length, unmap)

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        cover: list[tuple[int, int]] = run_sync(self._core.write_zeroes(offset, length, unmap))
        for pos, n in zero_pieces(cover):
            self._write(pos, memoryview(bytes(n)))

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """What holds each part of [offset, offset+length) (default: the whole disk), through the chain."""
        if length is None:
            length = self.size - offset
        return self._step(self._core.extents(offset, length))

    def flush(self) -> None:
        """Every write so far is durable when this returns (data first, then the BAT through the log)."""
        self._step(self._core.flush())

    def close(self) -> None:
        """Flush, apply the log, leave a clean image, release the locks. Closing twice does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            run_sync(self._core.close())

    def __enter__(self) -> Disk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
