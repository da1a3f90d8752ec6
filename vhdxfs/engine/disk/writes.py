"""The write side of a layer (``DiskCore``): plans of writes, the steps that prepare them, write-zeroes.

Apart from core.py only to keep files short: ``LayerWrites`` is mixed into ``DiskCore`` and works on the
attributes DiskCore sets (declared here for the type checker).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from ...errors import OutOfRangeError, ReadOnlyError, Reason, VhdxError
from ...format.bat import Geometry, PayloadState
from ..image.block_table import BlockAllocationTable
from ..image.headers import HeaderState
from ..image.locations import Location
from .allocate import Allocation
from .guards import BlockGuards, WritePlan
from .runs import Kind, Run, add_run, blocks
from .steps import Step, StepIO
from .translate import Translator

_PRESENT = int(PayloadState.FULLY_PRESENT)
_PARTIAL = int(PayloadState.PARTIALLY_PRESENT)
_NOT_PRESENT = int(PayloadState.NOT_PRESENT)
_DATA = Kind.DATA
_run = tuple.__new__  # a Run from a tuple of its fields, without the NamedTuple's Python-level __new__


class LayerWrites:
    """Writes into one layer: mixed into DiskCore."""

    path: Location
    size: int
    block_size: int
    geometry: Geometry
    read_only: bool
    fixed: bool
    bat: BlockAllocationTable
    headers: HeaderState
    translator: Translator
    allocation: Allocation
    guards: BlockGuards
    parent: LayerWrites | None
    io: StepIO

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(f"request {offset}+{length} lies outside the disk ({self.size} bytes)",
                                  path=self.path)

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("image is open read-only", path=self.path)

    def locate_write(self, offset: int, length: int) -> int | None:
        """The file offset of a write of [offset, offset+length) into one allocated block (most requests),
        else None: then ``plan_write``. It holds no guard (guards.py), so the caller must queue the bytes
        before it yields: a queued write lands before any later reuse of the block's space."""
        block, within = divmod(offset, self.block_size)
        if within + length > self.block_size or offset < 0 or length <= 0 or offset + length > self.size \
                or self.read_only or not self.headers.data_writes_begun:
            return None
        state, file_offset = self.bat.payload(block)
        return file_offset + within if state == _PRESENT else None

    def plan_write(self, offset: int, length: int) -> WritePlan | None:
        """The plan of a write of [offset, offset+length), or None: ``prepare_write`` must first change the
        DataWriteGuid, allocate or load a bitmap; or, when ``sector_span`` differs from the range, the
        driver must widen the write to whole sectors (a sector bitmap has no finer grain)."""
        if self.read_only:
            self._writable()
        if offset < 0 or length < 0 or offset + length > self.size:
            self.check_range(offset, length)
        if not self.headers.data_writes_begun:
            return None
        bs = self.block_size
        block, within = divmod(offset, bs)
        if within + length <= bs:  # most requests: one block, allocated
            state, file_offset = self.bat.payload(block)
            if state == _PRESENT:
                guards = self.guards
                counts = guards.counts  # guards.hold(file_offset), written out
                counts[file_offset] = counts.get(file_offset, 0) + 1
                return WritePlan(offset, (_run(Run, (offset, length, _DATA, file_offset + within, 0)),), guards,
                                 [file_offset])
        runs: list[Run] = []
        used: list[int] = []
        marks: list[Callable[[], None]] = []
        aligned = self.sector_span(offset, length) == (offset, offset + length)
        for block, within, pos, n in blocks(offset, length, bs):
            state, file_offset = self.bat.payload(block)
            if state == _PARTIAL:
                if not aligned or not self.translator.loaded(block // self.geometry.chunk_ratio):
                    return None
                marks.append(functools.partial(self.allocation.mark_present, block, pos, n))
            elif state != _PRESENT:
                return None
            add_run(runs, pos, n, _DATA, file_offset + within)
            used.append(file_offset)
        for block_offset in used:
            self.guards.hold(block_offset)
        return WritePlan(offset, runs, self.guards, used, marks)

    def sector_span(self, offset: int, length: int) -> tuple[int, int]:
        """[start, end) a write of the range must cover: whole sectors in a differencing image."""
        if self.parent is None:
            return offset, offset + length
        lss = self.geometry.logical_sector_size
        return offset // lss * lss, -(-(offset + length) // lss) * lss

    def prepare_write(self, offset: int, length: int) -> Step[WritePlan]:
        """Do what a write of [offset, offset+length) needs (its range: ``sector_span`` of itself); its plan."""
        self._writable()
        self.check_range(offset, length)
        if self.sector_span(offset, length) != (offset, offset + length):
            raise VhdxError(f"internal: a write at {offset}+{length} into a differencing image must cover whole "
                            "sectors", path=self.path, reason=Reason.INTERNAL)
        if not self.headers.data_writes_begun:
            # 2.2.2.1: a new DataWriteGuid before the first change a reader of the disk could observe.
            yield (self.io.call, self.headers.begin_data_writes)
        while (plan := self.plan_write(offset, length)) is None:
            for block, _within, _pos, _n in blocks(offset, length, self.block_size):
                state, _file_offset = self.bat.payload(block)
                if state != _PRESENT and (state != _PARTIAL or not self.translator.loaded(
                        block // self.geometry.chunk_ratio)):
                    yield from self.allocation.allocate(block)  # also loads a PARTIALLY_PRESENT block's bitmap
        return plan

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> Step[list[tuple[int, int]]]:
        """The range reads as zeros afterwards (never as the parent). With ``unmap``, whole blocks give their
        space back (they become ZERO); without, allocated blocks stay allocated and hold zeros.

        Returns the ranges the driver must still write zeros into: where a parent shows through."""
        self._writable()
        self.check_range(offset, length)
        cover: list[tuple[int, int]] = []
        if not length:
            return cover
        if not self.headers.data_writes_begun:
            yield (self.io.call, self.headers.begin_data_writes)
        bs, has_parent = self.block_size, self.parent is not None
        for block, within, pos, n in blocks(offset, length, bs):
            whole = within == 0 and n == min(bs, self.size - block * bs)
            state, _file_offset = self.bat.payload(block)
            if unmap and whole and not self.fixed and (has_parent or state in (_PRESENT, _PARTIAL)):
                yield from self.allocation.unmap(block)
            elif state == _PRESENT:
                plan = self.plan_write(pos, n)
                assert plan is not None, "a write into a FULLY_PRESENT block needs nothing first"
                try:
                    for run in plan.runs:
                        yield (self.io.write_zeros, run.file_offset, run.length)
                except BaseException:
                    plan.release()
                    raise
                plan.complete()
            elif has_parent and state in (_PARTIAL, _NOT_PRESENT):  # the parent shows through: cover it
                cover.append((pos, n))
        return cover
