"""What the data movers copy: the pieces of a source, each read straight from the file that holds it.

A piece is a range of the virtual disk (of a raw file: the file itself) that holds data, with where to read
it: a host file and an offset in it. Pieces never cross a multiple of the chunk size (the mover's buffer),
so reads and writes are large and aligned.

``ChainSource`` is a VHDX disk (its whole parent chain) opened read-only. Its DATA extents (the engine's
translation: ``Disk.extents``) say which layer's file holds each range and where, contiguously, so the
mover reads them with one ``pread`` each instead of a ``Disk.read`` per chunk: safe, as every layer is
open read-only under a shared lock, so no one writes them meanwhile. Ranges the file system holds as holes
are left out (they read as zeros: hostfile.py). One exception: a layer whose dirty log was replayed in
memory (a read-only open never writes the file) may hold newer bytes in the log than in place, so such a
chain is read through ``Disk.read``, which applies the log.

``RawSource`` is a raw file: its data ranges by SEEK_DATA, read with pread.

Either may be an object in an S3 store (``s3://BUCKET/KEY``): its layers' hosts are then the S3 host
(remote.py), which cannot tell holes, so every range counts as data and the zero scan alone keeps the
output sparse. The mover's 1 MiB reads are large enough to go to the store directly, with the next ones
fetched meanwhile while they are sequential.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from ..disk.chain import open_chain
from ..disk.runs import Kind
from ..disk.sync import Disk
from ..image.host import HostFactory, HostIO
from ..image.hosts import open_host
from ..image.locations import S3Location, parse
from ..image.posix import PosixFile
from .hostfile import data_ranges

# (where, into): fill ``into`` with the bytes that start at ``where`` (a file offset, or for ``Disk.read``
# the virtual offset).
ReadInto = Callable[[int, memoryview], None]


class Piece(NamedTuple):
    """``length`` bytes at ``offset`` of the disk: DATA, read by ``read(at, view)``; or ZERO (commit: the
    range reads as zeros in the source, the target must too)."""

    offset: int
    length: int
    kind: Kind
    read: ReadInto | None = None
    at: int = -1


def split(offset: int, length: int, chunk: int, read: ReadInto, at: int) -> Iterator[Piece]:
    """DATA pieces of [offset, offset+length) that end on multiples of ``chunk`` (the file range at ``at``
    holds it contiguously)."""
    end = offset + length
    while offset < end:
        n = min(end, (offset // chunk + 1) * chunk) - offset
        yield Piece(offset, n, Kind.DATA, read, at)
        offset += n
        at += n


class ChainSource:
    """A VHDX disk and its parents, open read-only, as DATA pieces read straight from the layers' files."""

    def __init__(self, path: str | os.PathLike[str] | S3Location,
                 parent: str | os.PathLike[str] | S3Location | None = None, *,
                 host_factory: HostFactory = PosixFile) -> None:
        core = open_chain(path, read_only=True, parent=parent, host_factory=host_factory)
        self.disk = Disk(core)
        layers = core.layers()
        self.hosts: list[HostIO] = [layer.image.host for layer in layers]
        self.through_log = any(layer.image.overlay is not None for layer in layers)
        self.path = parse(path)
        self.size = self.disk.size

    def _read_disk(self, offset: int, view: memoryview) -> None:
        view[:] = self.disk.read(offset, len(view))

    def pieces(self, chunk: int) -> Iterator[Piece]:
        """The disk's data, in order, in pieces that end on multiples of ``chunk``."""
        for extent in self.disk.extents():
            if extent.kind != Kind.DATA:
                continue  # zeros or a hole: nothing to copy
            if self.through_log:
                yield from split(extent.offset, extent.length, chunk, self._read_disk, extent.offset)
                continue
            host = self.hosts[extent.depth]
            for at, n in data_ranges(host, extent.file_offset, extent.length):
                yield from split(extent.offset + at - extent.file_offset, n, chunk, host.pread_into, at)

    def close(self) -> None:
        self.disk.close()


class RawSource:
    """A raw file (or object), read where it holds data (no lock: a raw file is no image of ours)."""

    def __init__(self, path: str | os.PathLike[str] | S3Location) -> None:
        self.path = parse(path)
        self.host = open_host(self.path, writable=False, local_factory=_unlocked)
        self.size = self.host.size()

    def pieces(self, chunk: int) -> Iterator[Piece]:
        for at, n in data_ranges(self.host, 0, self.size):
            yield from split(at, min(n, self.size - at), chunk, self.host.pread_into, at)

    def close(self) -> None:
        self.host.close()


def _unlocked(path: Path, *, writable: bool) -> HostIO:
    return PosixFile(path, writable=writable, lock=False)
