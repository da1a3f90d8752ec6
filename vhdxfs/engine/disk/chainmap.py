"""The chain map: for each block of a chain below its top, which frozen layer answers, found once and kept.

Why: a read the top does not answer itself used to walk the chain layer by layer, translating the range in
each, so a chain of twenty checkpoints read twenty times slower than one image even where no layer held
anything. Frozen layers do not change while they are parents (a checkpoint froze them; only a merge
writes one, see below), so what answers a block below the top is worked out the first time that block
is read and kept: one entry of two bytes per map block, the smallest block size of the frozen layers.

An entry says: DATA in layer d (its block is FULLY_PRESENT: the file offset comes from d's BAT, one
lookup), ZERO in layer d (a ZERO, UNMAPPED or UNDEFINED block shadows everything below it), HOLE (no
layer holds it, the base included), or MIXED from layer d (d's block is PARTIALLY_PRESENT: its sector
bitmap decides, sector run by sector run, as the walk did before; only these blocks still walk).

Memory: entries live in pages of 4,096, made when a block of the page is first read: at most 2 bytes per
map block, 32 MiB for a 64 TiB chain of 2 MiB blocks read end to end; nothing for blocks never read.

When it is rebuilt: ``DiskCore.chain`` makes a new one whenever the chain changes (a checkpoint, the
switch of a merge, a resize). While a merge copies a layer into its parent the parent changes under the
map, but only in blocks the merged layer answers for itself, which a read of the layers above never takes
from the map: an entry stays true for every read that uses it.
"""

from __future__ import annotations

from array import array
from typing import Generic, Protocol, TypeVar

from ...format.bat import PayloadState
from ..image.block_table import BlockAllocationTable

DATA, ZERO, HOLE, MIXED = 1, 2, 3, 4  # an entry is kind << 8 | depth; 0 is "not worked out yet"
_PAGE_SHIFT = 12
_IN_PAGE = (1 << _PAGE_SHIFT) - 1
_PRESENT = int(PayloadState.FULLY_PRESENT)
_PARTIAL = int(PayloadState.PARTIALLY_PRESENT)
_NOT_PRESENT = int(PayloadState.NOT_PRESENT)


class MapLayer(Protocol):
    """What the map reads of a layer (a DiskCore)."""

    @property
    def size(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def bat(self) -> BlockAllocationTable: ...


L = TypeVar("L", bound=MapLayer)


class ChainMap(Generic[L]):
    """What answers below the top of ``layers`` (the whole chain, top first; entries cover layers[1:])."""

    __slots__ = ("layers", "grain", "pages")

    def __init__(self, layers: list[L]) -> None:
        self.layers = layers
        self.grain = min(layer.block_size for layer in layers[1:])
        blocks = -(-layers[0].size // self.grain)
        self.pages: list[array[int] | None] = [None] * -(-blocks >> _PAGE_SHIFT)

    def entry(self, block: int) -> int:
        """The entry of map block ``block`` (worked out now if it was not)."""
        page = self.pages[block >> _PAGE_SHIFT]
        if page is None:
            page = self.pages[block >> _PAGE_SHIFT] = array("H", bytes(2 << _PAGE_SHIFT))
        code = page[block & _IN_PAGE]
        if not code:
            code = page[block & _IN_PAGE] = self._work_out(block)
        return code

    def _work_out(self, block: int) -> int:
        at = block * self.grain
        layers = self.layers
        for depth in range(1, len(layers)):
            layer = layers[depth]
            state, _offset = layer.bat.payload(at // layer.block_size)
            if state == _PRESENT:
                return DATA << 8 | depth
            if state == _PARTIAL:
                return MIXED << 8 | depth
            if state != _NOT_PRESENT:
                return ZERO << 8 | depth
        return HOLE << 8 | (len(layers) - 1)

    def same_until(self, pos: int, code: int, end: int) -> int:
        """How far from ``pos`` (before ``end``) the answer ``code`` found at ``pos`` goes on: to the end of
        the answering layer's block, and no further than the next block any layer above it may hold (for a
        HOLE: any layer). So a long read or an extents call over a sparse chain takes a few steps, not one
        per block; a short request never asks."""
        kind, depth = code >> 8, code & 0xFF
        limit = end
        if kind != HOLE:
            size = self.layers[depth].block_size
            limit = min(limit, (pos // size + 1) * size)
        for layer in self.layers[1:depth if kind != HOLE else len(self.layers)]:
            size = layer.block_size
            limit = min(limit, layer.bat.next_block_held(pos // size) * size)
        return max(limit, min(end, (pos // self.grain + 1) * self.grain))

    def known(self) -> int:
        """Entries worked out so far (for status and tests)."""
        return sum((1 << _PAGE_SHIFT) - page.count(0) for page in self.pages if page is not None)
