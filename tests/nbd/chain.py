"""A differencing chain for the allocation-depth tests, and a model of it built from the writes alone.

``make_chain`` makes base.vhdx <- mid.avhdx <- top.avhdx (1 MiB blocks, 512-byte sectors) and writes each
layer through the engine; ``Chain`` remembers every write and discard, and says from them (never from the
images) what each layer reads as and what ``qemu:allocation-depth`` must report for it:

- in the base, a write allocates its whole blocks (a dynamic image allocates on write; the rest of the
  block reads as zeros);
- in a child, a write allocates exactly the sectors it touches (the sector bitmap), an unaligned one
  widened to whole sectors; a discard of whole blocks allocates them as zeros (the block's state hides the
  parent);
- served as layer k, the layer j <= k that last allocated a sector reports k - j + 1; no layer: 0.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import make_image
from vhdxfs.engine import Disk, create_child

KiB, MiB = 1 << 10, 1 << 20
SIZE = 64 * MiB
BLOCK = MiB
SECTOR = 512

# (offset, length) of each layer's writes, and whole-block discards (children only).
BASE_WRITES = [(0, 3 * MiB), (8 * MiB, MiB), (20 * MiB + 4 * KiB, 8 * KiB), (40 * MiB, 2 * MiB)]
MID_WRITES = [(MiB + 4 * KiB, 8 * KiB), (2 * MiB, MiB), (10 * MiB, 512 * KiB), (20 * MiB, 4 * KiB),
              (33 * MiB - 512, 1024), (45 * MiB + 100, 1000)]
MID_DISCARDS = [(40 * MiB, MiB), (12 * MiB, MiB)]  # over the base's data, and over nothing
TOP_WRITES = [(0, 4 * KiB), (2 * MiB + 8 * KiB, 4 * KiB), (50 * MiB, MiB), (SIZE - 4 * KiB, 4 * KiB)]
TOP_DISCARDS = [(8 * MiB, MiB)]


@dataclass
class Layer:
    path: Path
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    discards: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Chain:
    layers: list[Layer]  # the base first

    def content(self, k: int) -> bytearray:
        """What layer ``k`` (0: the base) reads as."""
        out = bytearray(SIZE)
        for layer in self.layers[:k + 1]:
            for offset, data in layer.writes:
                out[offset:offset + len(data)] = data
            for offset, length in layer.discards:
                out[offset:offset + length] = bytes(length)
        return out

    def depths(self, k: int) -> list[tuple[int, int, int]]:
        """(offset, length, depth) runs of qemu:allocation-depth when layer ``k`` is the export."""
        return allocation_depths(SIZE, [([(o, len(d)) for o, d in layer.writes], layer.discards)
                                        for layer in self.layers[:k + 1]])


def allocation_depths(size: int, layers: list[tuple[list[tuple[int, int]], list[tuple[int, int]]]],
                      base_block: int = BLOCK) -> list[tuple[int, int, int]]:
    """(offset, length, depth) runs of qemu:allocation-depth for a chain whose layers (the base first, the
    export last) saw these (offset, length) writes and whole-block discards."""
    sectors = bytearray(size // SECTOR)
    for j, (writes, discards) in enumerate(layers):
        value = len(layers) - j
        for offset, length in writes:
            start, end = offset, offset + length
            if j == 0:  # the base allocates whole blocks
                start, end = start // base_block * base_block, -(-end // base_block) * base_block
            first, last = start // SECTOR, -(-end // SECTOR)
            sectors[first:last] = bytes([value]) * (last - first)
        for offset, length in discards:
            sectors[offset // SECTOR:(offset + length) // SECTOR] = bytes([value]) * (length // SECTOR)
    return runs(sectors)


def runs(sectors: bytearray) -> list[tuple[int, int, int]]:
    out, at = [], 0
    for value, group in itertools.groupby(sectors):
        n = sum(1 for _ in group) * SECTOR
        out.append((at, n, value))
        at += n
    return out


def merged(extents: Iterator[tuple[int, int, int]] | list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(offset, length, value) extents with neighbours of the same value joined (clients split them where
    their requests ended)."""
    out: list[tuple[int, int, int]] = []
    for offset, length, value in extents:
        if out and out[-1][2] == value and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, value)
        else:
            out.append((offset, length, value))
    return out


def ranges_of(extents: list[tuple[int, int, int]], value: int) -> list[tuple[int, int]]:
    return [(offset, length) for offset, length, v in extents if v == value]


def make_chain(directory: Path, seed: int = 7) -> Chain:
    mid, top = directory / "mid.avhdx", directory / "top.avhdx"
    plans = [(BASE_WRITES, []), (MID_WRITES, MID_DISCARDS), (TOP_WRITES, TOP_DISCARDS)]
    return write_chain([directory / "base.vhdx", mid, top], plans, random.Random(seed))


def make_deep_chain(directory: Path, children: int = 20, seed: int = 24) -> Chain:
    """A base and ``children`` layers over it, each with a few random writes (unaligned ones too) and a
    whole-block discard now and then: the deep chain the chain map answers for."""
    rnd = random.Random(seed)
    plans: list[tuple[list[tuple[int, int]], list[tuple[int, int]]]] = []
    for i in range(children + 1):
        writes = [(rnd.randrange(0, SIZE - 2 * MiB) + rnd.choice([0, 0, 100]),
                   rnd.choice([512, 4 * KiB, 64 * KiB, MiB + 512])) for _ in range(rnd.randrange(2, 8))]
        discards = [(rnd.randrange(0, SIZE // BLOCK) * BLOCK, BLOCK)] if i and rnd.random() < 0.5 else []
        plans.append((writes, discards))
    paths = [directory / "base.vhdx", *(directory / f"layer{i:02}.avhdx" for i in range(children))]
    return write_chain(paths, plans, rnd)


def write_chain(paths: list[Path], plans: list[tuple[list[tuple[int, int]], list[tuple[int, int]]]],
                rnd: random.Random) -> Chain:
    """Each path a layer over the one before (the first the base), written through the engine as its plan
    says: (offset, length) writes of random bytes, then (offset, length) discards."""
    base = make_image(paths[0], SIZE, block_size=BLOCK)
    chain = Chain([Layer(base), *(Layer(path) for path in paths[1:])])
    for i, (layer, (writes, discards)) in enumerate(zip(chain.layers, plans, strict=True)):
        if i:
            create_child(layer.path, chain.layers[i - 1].path, block_size=BLOCK)
        with Disk.open(layer.path) as disk:
            for offset, length in writes:
                data = rnd.randbytes(length)
                disk.write(offset, data)
                layer.writes.append((offset, data))
            for offset, length in discards:
                disk.discard(offset, length)
                layer.discards.append((offset, length))
    return chain
