"""DiskCore: the virtual disk of one image and its parents. Its contract with the drivers is resolve + guard.

A driver (the synchronous ``Disk``, sync.py; the trio ``AsyncDisk``, aio/asyncdisk.py) asks for a plan,
moves the plan's bytes, and completes it:

- ``plan_read(offset, length)`` / ``plan_write(offset, length)``: the plan at once (plain computation, no
  I/O), or None when something must be done first: a sector bitmap loaded, a block allocated, the
  DataWriteGuid changed, a write into a differencing image widened to whole sectors. Then
  ``prepare_read`` / ``prepare_write``, steps (steps.py) that do that and return the plan;
- a plan holds typed runs (runs.py: DATA at a file offset of a layer, ZERO, HOLE; never PARENT: the chain
  is resolved) and a guard on the blocks they lie in (guards.py); ``complete()`` marks written sectors
  present and lets the blocks go.

Everything else (write-zeroes, extents, flush, close) is a step: metadata work with little payload.
The parts: Translator (translate.py), Allocation (allocate.py), Flusher (flush.py), BlockGuards.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

from ...errors import OutOfRangeError, ReadOnlyError, Reason, VhdxError
from ...format.bat import PayloadState
from ..image.journal import LogWriter, Overlay
from ..image.loader import VhdxFile
from .allocate import Allocation
from .flush import Flusher
from .guards import BlockGuards, Held, ReadPlan, WritePlan
from .runs import Extent, Kind, Run, add_extent, add_run, blocks
from .steps import Step, StepIO
from .translate import Translator, new_bitmaps

# Plain ints: compared on every request, where an IntEnum comparison costs a method call.
_PRESENT = int(PayloadState.FULLY_PRESENT)
_PARTIAL = int(PayloadState.PARTIALLY_PRESENT)
_NOT_PRESENT = int(PayloadState.NOT_PRESENT)
_DATA = Kind.DATA
_run = tuple.__new__  # a Run from a tuple of its fields, without the NamedTuple's Python-level __new__


class DiskCore:
    """One layer of a chain: an image file, its translation, allocation and flush; ``parent`` below it."""

    def __init__(self, image: VhdxFile, parent: DiskCore | None) -> None:
        self.image = image
        self.parent = parent
        self.depth = 0  # numbered by ``chain``: 0 for the top, 1 for its parent, ...
        self.path: Path = image.path
        self.geometry = g = image.geometry
        self.size = g.virtual_size
        self.block_size = g.block_size
        self.read_only = image.read_only
        self.fixed = image.metadata.leave_block_allocated
        self.bat = image.bat
        self.headers = image.headers
        bitmaps = new_bitmaps(g, image.read_meta) if image.is_differencing else None
        self.translator = Translator(image.bat, bitmaps, has_parent=parent is not None)
        self.allocation = Allocation(self.translator, image.host.size(), has_parent=parent is not None)
        self.guards = BlockGuards()
        self.flusher = Flusher(image.headers, LogWriter(image.host, image.headers), self.allocation, self.guards)
        self.io: StepIO
        self._attached: StepIO | None = None
        self._overlays = False  # does any layer of the chain read through a replayed log (set by ``chain``)

    def chain(self) -> DiskCore:
        """Number the layers (depth) from this one, the top; this layer."""
        layers = self.layers()
        overlays = any(layer.image.overlay is not None for layer in layers)
        for depth, layer in enumerate(layers):
            layer.depth = depth
            layer._overlays = overlays
        return self

    def layers(self) -> list[DiskCore]:
        """This layer and the ones below it, child first."""
        out: list[DiskCore] = []
        layer: DiskCore | None = self
        while layer is not None:
            out.append(layer)
            layer = layer.parent
        return out

    def attach(self, ios: Sequence[StepIO]) -> None:
        """Bind every layer, top first, to its StepIO (the synchronous or the async driver's); a layer bound
        to the same StepIO before (a chain changed by a live operation) keeps its locks."""
        for layer, io in zip(self.layers(), ios, strict=True):
            if layer._attached is io:
                continue
            layer.io = layer._attached = io
            layer.allocation.attach(io)
            layer.flusher.attach(io)

    def close_files(self) -> None:
        """Close every layer's host file without flushing (for failed opens, and for abandoning a disk)."""
        for layer in self.layers():
            layer.image.close()

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(f"request {offset}+{length} lies outside the disk ({self.size} bytes)",
                                  path=self.path)

    # -- reads --------------------------------------------------------------------------------------------
    def plan_read(self, offset: int, length: int) -> ReadPlan | None:
        """The plan of a read of [offset, offset+length), or None: ``prepare_read`` must load a bitmap first."""
        if offset < 0 or length < 0 or offset + length > self.size:
            self.check_range(offset, length)
        block, within = divmod(offset, self.block_size)
        if within + length <= self.block_size and not self._overlays:  # most requests: one block, here
            state, file_offset = self.bat.payload(block)
            if state == _PRESENT:
                guards = self.guards
                counts = guards.counts  # guards.hold(file_offset), written out
                counts[file_offset] = counts.get(file_offset, 0) + 1
                return ReadPlan(offset, (_run(Run, (offset, length, _DATA, file_offset + within, self.depth)),),
                                [(guards, file_offset)])
        runs: list[Run] = []
        held: Held = []
        if self._resolve(offset, length, runs, held) is not None:
            return None
        for guards, block_offset in held:
            guards.hold(block_offset)
        return ReadPlan(offset, runs, held, self._patches(runs) if self._overlays else None)

    def prepare_read(self, offset: int, length: int) -> Step[ReadPlan]:
        """Load what a read of [offset, offset+length) needs; its plan."""
        while (plan := self.plan_read(offset, length)) is None:
            yield from self._load_missing(offset, length)
        return plan

    def _resolve(self, offset: int, length: int, out: list[Run], held: Held | None) -> tuple[DiskCore, int] | None:
        """Append the runs of the range through the chain to ``out`` (and the blocks they read from to
        ``held``); or (layer, chunk) of the first sector bitmap that must be loaded first."""
        runs: list[Run] = []
        used: list[int] | None = [] if held is not None else None
        need = self.translator.translate(offset, length, runs, depth=self.depth, used=used)
        if need is not None:
            return self, need.chunk
        if held is not None and used:
            held.extend((self.guards, block_offset) for block_offset in used)
        for run in runs:
            if run.kind != Kind.PARENT:
                out.append(run)
                continue
            assert self.parent is not None
            missing = self.parent._resolve(run.offset, run.length, out, held)
            if missing is not None:
                return missing
        return None

    def _load_missing(self, offset: int, length: int) -> Step[None]:
        missing = self._resolve(offset, length, [], None)
        if missing is not None:
            layer, chunk = missing
            yield from layer.translator.load_bitmap(layer.io, chunk)

    def _patches(self, runs: list[Run]) -> list[tuple[Overlay, Run]]:
        """DATA runs of layers read through a replayed log, with that log (read-only opens of dirty images)."""
        layers = self.layers()
        out = []
        for run in runs:
            overlay = layers[run.depth - self.depth].image.overlay if run.kind == _DATA else None
            if overlay:
                out.append((overlay, run))
        return out

    def extents(self, offset: int, length: int) -> Step[list[Extent]]:
        """Extents of [offset, offset+length) through the whole chain, coalesced."""
        self.check_range(offset, length)
        runs: list[Run] = []
        while self._resolve(offset, length, runs, None) is not None:
            yield from self._load_missing(offset, length)
            runs = []
        layers, out = self.layers(), list[Extent]()
        for run in runs:
            depth = run.depth - self.depth
            add_extent(out, Extent(run.offset, run.length, run.kind, layers[depth].path, depth, run.file_offset))
        return out

    # -- writes -------------------------------------------------------------------------------------------
    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("image is open read-only", path=self.path)

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

    # -- durability ---------------------------------------------------------------------------------------
    def flush(self) -> Step[None]:
        if not self.read_only:
            yield from self.flusher.flush()

    def close(self) -> Step[None]:
        """Flush, apply the log, clear LogGuid (a clean image), close the files of every layer."""
        try:
            if not self.read_only:
                yield from self.flusher.flush()
                yield from self.flusher.finish()
        finally:
            yield (self.io.close,)
            if self.parent is not None:
                yield from self.parent.close()
