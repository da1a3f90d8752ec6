"""Disk: a virtual disk for synchronous callers (the offline tools, the Python library), without trio.

Runs the engine's steps (core.py) with ``run_sync`` and ``SyncIO``: each call does its I/O in the
calling thread. Thread-safe: one operation runs at a time (a lock around each call), so the steps need
no locks of their own here. The daemon uses AsyncDisk (aio/disk.py), which runs the same steps.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

from ...errors import VhdxError
from ..image.host import HostFactory, PosixFile
from .core import DiskCore
from .steps import SyncIO, run_sync
from .translate import Extent


class DiskFacts:
    """What a disk is, the same for Disk and AsyncDisk (both keep their DiskCore in ``_core``)."""

    _core: DiskCore
    _closed: bool

    @property
    def path(self) -> Path:
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

    def chain(self) -> list[Path]:
        """This image and its parents, child first."""
        return [layer.path for layer in self._core.layers()]


class Disk(DiskFacts):
    """One image (and its parents) opened for reading, or reading and writing; use as a context manager."""

    def __init__(self, core: DiskCore) -> None:
        core.attach(SyncIO)
        self._core = core
        self._lock = threading.RLock()
        self._closed = False

    @classmethod
    def open(cls, path: str | os.PathLike, *, read_only: bool = False, parent: str | os.PathLike | None = None,
             host_factory: HostFactory = PosixFile, data_write_guid: uuid.UUID | None = None) -> Disk:
        """Open ``path``; a differencing image finds its parents (``parent`` overrides the nearest one's
        locator). Writable opens take the image's exclusive lock, read-only ones a shared lock; a dirty
        log is replayed (in memory when read-only). ``data_write_guid``: the DataWriteGuid the first
        write sets instead of a random one (commit, spec note 12)."""
        return cls(DiskCore.open(path, read_only=read_only, parent=parent, host_factory=host_factory,
                                 data_write_guid=data_write_guid))

    # -- I/O ----------------------------------------------------------------------------------------------
    def _run(self, step):
        with self._lock:
            if self._closed:
                raise VhdxError("image is closed", path=self.path)
            return run_sync(step)

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """The bytes of [offset, offset+length); the range must lie inside the disk."""
        return self._run(self._core.read(offset, length))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (any alignment); durable after the next flush."""
        self._run(self._core.write(offset, data))

    def discard(self, offset: int, length: int) -> None:
        """The range reads as zeros (never as a parent's data); whole blocks give their space back."""
        self._run(self._core.write_zeroes(offset, length, True))

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """The range reads as zeros; with ``unmap`` whole blocks are unmapped as by discard."""
        self._run(self._core.write_zeroes(offset, length, unmap))

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """What holds each part of [offset, offset+length) (default: the whole disk), through the chain."""
        if length is None:
            length = self.size - offset
        return self._run(self._core.extents(offset, length))

    def flush(self) -> None:
        """Every write so far is durable when this returns (data first, then the BAT through the log)."""
        self._run(self._core.flush())

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
