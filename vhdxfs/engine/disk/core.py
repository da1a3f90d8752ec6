"""DiskCore: the virtual disk of one image and its parents. Its contract with the drivers is resolve + guard.

A driver (the synchronous ``Disk``, sync.py; the trio ``AsyncDisk``, aio/asyncdisk.py) asks for a plan,
moves the plan's bytes, and completes it:

- ``plan_read(offset, length)`` / ``plan_write(offset, length)``: the plan at once (plain computation, no
  I/O), or None when something must be done first: a sector bitmap loaded, a block allocated, the
  DataWriteGuid changed, a write into a differencing image widened to whole sectors. Then
  ``prepare_read`` / ``prepare_write``, steps (steps.py) that do that and return the plan;
- a plan holds typed runs (runs.py: DATA at a file offset of a layer, ZERO, HOLE; never PARENT: the chain
  is resolved) and a guard on the blocks they lie in (guards.py); ``complete()`` marks written sectors
  present and lets the blocks go;
- ``locate(offset, length)`` / ``locate_write``: for a one-block request the driver serves before it yields
  (a page-cache read, a write into the write-back queue), only the file offset: no plan, no guard.

Everything else (write-zeroes, extents, flush, close) is a step: metadata work with little payload.
The parts: Translator (translate.py), Allocation (allocate.py), Flusher (flush.py), BlockGuards.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...format.bat import PayloadState
from ..image.journal import LogWriter, Overlay
from ..image.loader import VhdxFile
from ..image.locations import Location
from . import chainmap
from .allocate import Allocation
from .chainmap import ChainMap
from .flush import Flusher
from .guards import BlockGuards, Held, ReadPlan
from .runs import Extent, Kind, Run, add_extent, add_run
from .steps import Step, StepIO
from .translate import Translator, new_bitmaps
from .writes import LayerWrites

# Plain ints: compared on every request, where an IntEnum comparison costs a method call.
_PRESENT = int(PayloadState.FULLY_PRESENT)
_PARTIAL = int(PayloadState.PARTIALLY_PRESENT)
_NOT_PRESENT = int(PayloadState.NOT_PRESENT)
_DATA = Kind.DATA
_run = tuple.__new__  # a Run from a tuple of its fields, without the NamedTuple's Python-level __new__


class DiskCore(LayerWrites):
    """One layer of a chain: an image file, its translation, allocation and flush; ``parent`` below it."""

    parent: DiskCore | None

    def __init__(self, image: VhdxFile, parent: DiskCore | None) -> None:
        self.image = image
        self.parent = parent
        self.depth = 0  # numbered by ``chain``: 0 for the top, 1 for its parent, ...
        self.path: Location = image.path
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
        self.below: ChainMap[DiskCore] | None = None  # the top's: what answers below it (chainmap.py)

    def chain(self) -> DiskCore:
        """Number the layers (depth) from this one, the top, and map what answers below it afresh (after
        any change of the chain); this layer."""
        layers = self.layers()
        overlays = any(layer.image.overlay is not None for layer in layers)
        for depth, layer in enumerate(layers):
            layer.depth = depth
            layer._overlays = overlays
            layer.below = None
        self.below = ChainMap(layers) if len(layers) > 1 else None
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
            if state == _NOT_PRESENT and self.below is not None:  # one block of a frozen layer below
                plan = self._plan_below(offset, length)
                if plan is not None:
                    return plan
        runs: list[Run] = []
        held: Held = []
        if self._resolve(offset, length, runs, held) is not None:
            return None
        for guards, block_offset in held:
            guards.hold(block_offset)
        return ReadPlan(offset, runs, held, self._patches(runs) if self._overlays else None)

    def locate(self, offset: int, length: int) -> tuple[int, int] | None:
        """(layer depth, file offset) of a read of [offset, offset+length) that is one run of data in one
        block (most requests), else None: then ``plan_read``. It holds no guard (guards.py), so the caller
        must have the bytes before it yields: no flush can give the block's space away in between."""
        block, within = divmod(offset, self.block_size)
        if within + length > self.block_size or offset < 0 or length < 0 or offset + length > self.size \
                or self._overlays:
            return None
        state, file_offset = self.bat.payload(block)
        if state == _PRESENT:
            return self.depth, file_offset + within
        if state == _NOT_PRESENT and self.below is not None:
            found = self._below(offset, length)
            if found is not None:
                return found[0].depth, found[1] + found[2]
        return None

    def _below(self, offset: int, length: int) -> tuple[DiskCore, int, int] | None:
        """(layer, block's file offset, offset in the block) of a one-block read the chain map sends to a
        FULLY_PRESENT block of one frozen layer; None for anything else."""
        below = self.below
        assert below is not None
        grain = below.grain
        if offset % grain + length > grain:
            return None
        code = below.entry(offset // grain)
        if code >> 8 != chainmap.DATA:
            return None
        layer = below.layers[code & 0xFF]
        block, within = divmod(offset, layer.block_size)
        return layer, layer.bat.payload(block)[1], within

    def _plan_below(self, offset: int, length: int) -> ReadPlan | None:
        """The one-block plan of a read the chain map sends to a FULLY_PRESENT block of one frozen layer."""
        found = self._below(offset, length)
        if found is None:
            return None
        layer, file_offset, within = found
        guards = layer.guards
        counts = guards.counts
        counts[file_offset] = counts.get(file_offset, 0) + 1
        return ReadPlan(offset, (_run(Run, (offset, length, _DATA, file_offset + within, layer.depth)),),
                        [(guards, file_offset)])

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
            if self.below is not None:
                missing = self._resolve_below(run.offset, run.length, out, held)
            else:
                missing = self.parent._resolve(run.offset, run.length, out, held)
            if missing is not None:
                return missing
        return None

    def _resolve_below(self, offset: int, length: int, out: list[Run], held: Held | None
                       ) -> tuple[DiskCore, int] | None:
        """``_resolve`` of a range the top leaves to its parents, through the chain map: one BAT lookup per
        map block instead of a walk, but for PARTIALLY_PRESENT blocks, which walk from their layer."""
        below = self.below
        assert below is not None
        grain, layers = below.grain, below.layers
        pos, end = offset, offset + length
        while pos < end:
            m = pos // grain
            code = below.entry(m)
            n = (min((m + 1) * grain, end) if end <= (m + 1) * grain else below.same_until(pos, code, end)) - pos
            kind, layer = code >> 8, layers[code & 0xFF]
            if kind == chainmap.DATA:
                block, within = divmod(pos, layer.block_size)
                _state, file_offset = layer.bat.payload(block)
                add_run(out, pos, n, _DATA, file_offset + within, layer.depth)
                if held is not None:
                    held.append((layer.guards, file_offset))
            elif kind == chainmap.ZERO:
                add_run(out, pos, n, Kind.ZERO, -1, layer.depth)
            elif kind == chainmap.HOLE:
                add_run(out, pos, n, Kind.HOLE, -1, layer.depth)
            else:
                missing = layer._resolve(pos, n, out, held)
                if missing is not None:
                    return missing
            pos += n
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
