"""What the image targets share: turning an input into a mutated image, and reading an opened disk.

``case(data)`` picks the seed and applies the patches (tests/fuzz/patches.py). ``snapshot(disk)`` is what
a user sees of a disk, bounded so that a mutated virtual size of terabytes costs no more than a small one:
a few sectors, the first 2 MiB and the extents of the first 64 MiB.

``mark``/``stamp`` tell whether a file was written (the repair target works on a real file): anything that
writes or resizes it moves its mtime.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vhdxfs.engine import Disk

from .guards import memory_factory
from .patches import Reader, apply
from .seeds import NAMES, Seed, seeds

MiB = 1 << 20
READ_SPAN = 2 * MiB
EXTENT_SPAN = 64 * MiB


@dataclass
class Case:
    seed: Seed
    data: bytes | bytearray  # not to be changed: read-only opens share it

    @property
    def path(self) -> Path:
        """Where the mutated image is said to be: the seed's path (parents resolve beside it)."""
        return self.seed.path

    def images(self) -> dict[Path, bytes]:
        """Every image a read-only open may need: the mutated one and the unchanged seeds (parents)."""
        out = dict(seeds().by_path)
        out[self.seed.path] = self.data
        return out

    def factory(self):
        return memory_factory(self.images())

    def write_work_file(self) -> Path:
        """The mutated image as a real file beside the seeds (for targets that need a path)."""
        path = seeds().work_path(self.seed)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:  # over the old contents, not truncating first: tmpfs keeps its pages and this stays cheap
            os.pwrite(fd, self.data, 0)
            os.ftruncate(fd, len(self.data))
        finally:
            os.close(fd)
        return path


def case(data: bytes, names: tuple[str, ...] = NAMES) -> Case:
    r = Reader(data)
    seed = seeds().pick(r.int(1), names)
    return Case(seed, apply(seed, r))


def snapshot(disk: Disk) -> tuple:
    """A bounded digest of what ``disk`` reads: sector probes, the first 2 MiB, the first 64 MiB's extents."""
    size, sector = disk.size, disk.logical_sector_size
    probes = []
    for offset in (0, size // 2 // sector * sector, max(0, size - sector)):
        probes.append(bytes(disk.read(offset, min(sector, size - offset))))
    head = bytes(disk.read(0, min(size, READ_SPAN)))
    extents = [(e.offset, e.length, e.kind.name) for e in disk.extents(0, min(size, EXTENT_SPAN))]
    return probes, head, extents


def mark(path: Path) -> tuple[int, int]:
    """Set the mtime of ``path`` to 1 ns past the epoch and return its ``stamp``: if a later stamp differs,
    the file was written or resized since. Marking matters because file system clocks are coarse: a write
    in the same tick as the one before may leave mtime where it was."""
    os.utime(path, ns=(1, 1))
    return stamp(path)


def stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns

