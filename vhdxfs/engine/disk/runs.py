"""Typed runs: what the engine says about a virtual byte range, for the drivers that move its bytes.

A run is ``length`` bytes at virtual ``offset`` of one kind:

- ``DATA``: the file of layer ``depth`` (0: the image itself, 1: its parent, ...) holds them at
  ``file_offset`` (FULLY_PRESENT blocks, present sectors of a PARTIALLY_PRESENT block);
- ``ZERO``: zeros by the block's state (ZERO, UNMAPPED, UNDEFINED; a discarded block);
- ``HOLE``: unallocated (NOT_PRESENT) in an image without a parent, which reads as zeros;
- ``PARENT``: the parent's bytes (NOT_PRESENT blocks and absent sectors of a differencing image). Only one
  layer's translation gives PARENT runs; a plan resolves them through the chain, so drivers never see one.

``Extent`` is the same as the public API shows it: with the file of the layer that answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import IntEnum
from typing import NamedTuple

from ..image.locations import Location


class Kind(IntEnum):
    DATA = 0
    ZERO = 1
    HOLE = 2
    PARENT = 3


class Run(NamedTuple):
    """``length`` bytes at virtual ``offset``: of ``kind``, at ``file_offset`` of layer ``depth`` for DATA."""

    offset: int
    length: int
    kind: Kind
    file_offset: int = -1
    depth: int = 0


class Extent(NamedTuple):
    """A range of the virtual disk as a whole chain shows it: DATA, ZERO or HOLE, and which layer answered.

    ``layer`` is the file that holds the extent (for a HOLE: the base image, where nothing holds it),
    ``depth`` its place in the chain (0: the image itself, 1: its parent...), ``file_offset`` where DATA
    lies in that file (-1 otherwise).
    """

    offset: int
    length: int
    kind: Kind
    layer: Location
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


def add_run(runs: list[Run], offset: int, n: int, kind: Kind, file_offset: int = -1, depth: int = 0) -> None:
    """Append a run, merged with the last one when it continues it (same kind and layer, contiguous in the
    file for DATA)."""
    if runs:
        last = runs[-1]
        if last.kind == kind and last.depth == depth and (
                kind != Kind.DATA or last.file_offset + last.length == file_offset):
            runs[-1] = last._replace(length=last.length + n)
            return
    runs.append(Run(offset, n, kind, file_offset, depth))


def add_extent(out: list[Extent], extent: Extent) -> None:
    """Append an extent, merged with the last one when it continues it."""
    if out:
        last = out[-1]
        if last.kind == extent.kind and last.layer == extent.layer and last.depth == extent.depth and (
                extent.kind != Kind.DATA or last.file_offset + last.length == extent.file_offset):
            out[-1] = last._replace(length=last.length + extent.length)
            return
    out.append(extent)
