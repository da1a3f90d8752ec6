"""Translation: a virtual byte range of one image becomes typed runs, read from the BAT and sector bitmaps.

A run says where its bytes come from in this layer of a chain:

- ``DATA``: the file holds them at ``file_offset`` (FULLY_PRESENT blocks, present sectors of a
  PARTIALLY_PRESENT block);
- ``ZERO``: zeros by the block's state (ZERO, UNMAPPED, UNDEFINED; a discarded block);
- ``HOLE``: unallocated (NOT_PRESENT) in an image without a parent, which reads as zeros;
- ``PARENT``: the parent's bytes (NOT_PRESENT blocks and absent sectors of a differencing image).

Translation is a step (steps.py): it yields only to load a sector bitmap it has not seen yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import IntEnum
from pathlib import Path
from typing import NamedTuple

from ...format.bat import PayloadState
from ...format.constants import SECTOR_BITMAP_BLOCK_SIZE
from ..image.bitmaps import SectorBitmaps, bit_runs
from ..image.block_table import BlockAllocationTable
from .steps import Step, StepIO

_PRESENT = int(PayloadState.FULLY_PRESENT)
_PARTIAL = int(PayloadState.PARTIALLY_PRESENT)
_NOT_PRESENT = int(PayloadState.NOT_PRESENT)


class Kind(IntEnum):
    DATA = 0
    ZERO = 1
    HOLE = 2
    PARENT = 3


class Run(NamedTuple):
    """``length`` bytes at virtual ``offset``: of ``kind``, at ``file_offset`` for DATA (else -1)."""

    offset: int
    length: int
    kind: Kind
    file_offset: int = -1


class Extent(NamedTuple):
    """A range of the virtual disk as a whole chain shows it: DATA, ZERO or HOLE, and which layer answered.

    ``layer`` is the file that holds the extent (for a HOLE: the base image, where nothing holds it),
    ``depth`` its place in the chain (0: the image itself, 1: its parent...), ``file_offset`` where DATA
    lies in that file (-1 otherwise).
    """

    offset: int
    length: int
    kind: Kind
    layer: Path
    depth: int
    file_offset: int = -1


def blocks(offset: int, length: int, block_size: int) -> Iterator[tuple[int, int, int, int]]:
    """(block, offset within it, virtual offset, length) of each block piece of [offset, offset+length)."""
    end = offset + length
    while offset < end:
        block, within = divmod(offset, block_size)
        n = min(block_size - within, end - offset)
        yield block, within, offset, n
        offset += n


def add_run(runs: list[Run], offset: int, n: int, kind: Kind, file_offset: int = -1) -> None:
    """Append a run, merged with the last one when it continues it (same kind, contiguous in the file)."""
    if runs:
        last = runs[-1]
        if last.kind == kind and (kind != Kind.DATA or last.file_offset + last.length == file_offset):
            runs[-1] = last._replace(length=last.length + n)
            return
    runs.append(Run(offset, n, kind, file_offset))


class Translator:
    """Translation of one image: its BAT, its sector bitmaps (differencing images), whether it has a parent."""

    def __init__(self, bat: BlockAllocationTable, bitmaps: SectorBitmaps | None, has_parent: bool) -> None:
        self.bat = bat
        self.geometry = bat.geometry
        self.bitmaps = bitmaps
        self.has_parent = has_parent
        self.io: StepIO  # set by DiskCore.attach

    def bitmap(self, chunk: int) -> Step:
        """The sector bitmap block of ``chunk`` (loaded from the file on first use)."""
        bits = self.bitmaps.blocks.get(chunk)
        if bits is None:
            state, file_offset = self.bat.bitmap(chunk)
            bits = yield (self.io.call, self.bitmaps.load, chunk, state, file_offset)
        return bits

    def translate(self, offset: int, length: int) -> Step:
        """Runs covering [offset, offset+length), coalesced."""
        bs = self.geometry.block_size
        runs: list[Run] = []
        zero_kind = Kind.PARENT if self.has_parent else Kind.HOLE
        for block, within, pos, n in blocks(offset, length, bs):
            state, file_offset = self.bat.payload(block)
            if state == _PRESENT:
                add_run(runs, pos, n, Kind.DATA, file_offset + within)
            elif state == _PARTIAL:
                for voff, m, present in (yield from self.sector_runs(pos, n)):
                    if present:
                        add_run(runs, voff, m, Kind.DATA, file_offset + voff - block * bs)
                    else:
                        add_run(runs, voff, m, Kind.PARENT)
            elif state == _NOT_PRESENT:
                add_run(runs, pos, n, zero_kind)
            else:
                add_run(runs, pos, n, Kind.ZERO)
        return runs

    def sector_runs(self, offset: int, n: int) -> Step:
        """(virtual offset, length, present here) for [offset, offset+n) inside one PARTIALLY_PRESENT block."""
        lss = self.geometry.logical_sector_size
        first_sector, last_sector = offset // lss, (offset + n - 1) // lss
        chunk, bit = self.bitmaps.sector_position(first_sector)
        bits = yield from self.bitmap(chunk)
        out = []
        for start, count, present in bit_runs(bits, bit, last_sector - first_sector + 1):
            lo = max(offset, (first_sector + start - bit) * lss)
            hi = min(offset + n, (first_sector + start - bit + count) * lss)
            out.append((lo, hi - lo, present))
        return out


def new_bitmaps(geometry, read_meta) -> SectorBitmaps:
    """Sector bitmaps of a differencing image, read through ``read_meta`` (which applies a replayed log)."""
    return SectorBitmaps(geometry, lambda off: read_meta(off, SECTOR_BITMAP_BLOCK_SIZE))
