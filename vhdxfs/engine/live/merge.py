"""Merge a layer of a running chain into its parent (Hyper-V's "delete checkpoint") while the disk serves.

LAYER's contents go into its parent P; the layer above LAYER is re-pointed to P; LAYER is deleted; the
point in time P held is given up. Readers see the same bytes before, during and after: P only ever takes
on what LAYER shows over it, in blocks LAYER answers for, so a read through LAYER or through P after it
gives the same bytes.

An inner LAYER is frozen, so one copy does it. The active top changes while it is copied: the copy runs
again over what was written meanwhile (a mirror) until little is left, then the disk pauses for the rest
and switches to P as its top.

Crash safety, as the offline commit (engine/ops/commit.py) and in this order:
1. P is thawed (its lock turns exclusive; refused, naming no one, while a backup reads it) with a new
   DataWriteGuid chosen now, and LAYER's locator accepts both (parent_linkage2, through LAYER's own log):
   at every instant LAYER opens over P;
2. the copy; a crash leaves LAYER over a P that holds part of it: LAYER still answers for those blocks;
3. an inner LAYER: P is flushed, its log applied and P frozen again; the layer above LAYER is re-pointed
   to P (one log entry; from here a crash leaves the chain without LAYER) and the chain record forgets
   LAYER, all while the disk serves (reads through LAYER or through P give the same bytes now); then a
   pause only for the disk to take the new chain in memory;
   the active top: paused, the rest of the copy, P flushed, the chain record names P as the top (from
   here a crash leaves P with everything), the disk serves P;
4. after the pause, no request reaches LAYER: its file is removed.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ...errors import Reason, VhdxError
from ...format import guids
from ..aio import AsyncDisk
from ..aio.drive import drive
from ..disk.core import DiskCore
from ..image.locations import Location, S3Location
from .layers import copy_down, drop_file, find_layer, layers, own_blocks, record, repoint, set_writable, write_locator
from .state import Operation, exclusive

MIRROR_PASSES = 8  # copies of what the top wrote meanwhile before the final, paused one
SETTLED = 64 << 20  # a final copy of at most this much is done paused


@dataclass(frozen=True)
class MergeResult:
    layer: Location  # the layer merged (now deleted)
    parent: Location  # what it went into
    copied: int  # bytes of LAYER's blocks copied, every pass counted
    passes: int  # copies of the top (1 for an inner layer)


async def merge(disk: AsyncDisk, name: str | os.PathLike[str],
                progress: Callable[[Operation], None] | None = None) -> MergeResult:
    """Merge the layer ``name`` (a path, file name or stem) of the running ``disk`` into its parent."""
    place = find_layer(disk, name)
    chain = layers(disk)
    layer = chain[place]
    if layer.parent is None:
        raise VhdxError("is the base of the chain; there is no parent to merge it into", path=layer.path,
                        reason=Reason.BAD_ARGUMENT)
    parent = layer.parent
    if isinstance(parent.path, S3Location):
        raise VhdxError(f"its parent {parent.path} is in an object store, which vhdxfs only reads: a merge into it "
                        "is refused (merge the local layers above it, or download the base, merge, and upload it "
                        "with 'vhdxfs convert')", path=layer.path, errno=errno.EROFS, reason=Reason.READ_ONLY)
    with exclusive(disk, "merge", layer.path.name) as op:
        op.total = len(own_blocks(layer)) * layer.block_size
        upcoming = guids.new_guid()
        op.phase = "preparing"
        await _prepare(disk, layer, parent, upcoming)
        try:
            if place == 0:
                copied, passes = await _mirror(disk, layer, parent, op, progress)
            else:
                copied, passes = await copy_down(disk, layer, parent, own_blocks(layer), op), 1
                if progress:
                    progress(op)
                await _switch_inner(disk, chain[place - 1], layer, parent, op)
        except BaseException:
            with trio.CancelScope(shield=True):
                if parent in layers(disk) and parent is not disk.core:
                    await _refreeze(disk, parent)
            raise
    return MergeResult(layer.path, parent.path, copied, passes)


async def _prepare(disk: AsyncDisk, layer: DiskCore, parent: DiskCore, upcoming: uuid.UUID) -> None:
    """Step 1: P writable with the DataWriteGuid it will take; LAYER's locator accepting both of P's."""
    current = parent.image.header.data_write_guid
    locator = layer.image.metadata.parent_locator
    assert locator is not None, "a differencing layer has a parent locator"
    entries = dict(locator.entries)
    entries["parent_linkage"] = guids.braced(current)
    entries["parent_linkage2"] = guids.braced(upcoming)
    await set_writable(disk, parent, True, upcoming)
    try:
        await write_locator(disk, layer, entries)
    except BaseException:
        with trio.CancelScope(shield=True):
            await _refreeze(disk, parent)
        raise


async def _refreeze(disk: AsyncDisk, parent: DiskCore) -> None:
    """P back to frozen after a merge that did not finish (what it took of LAYER is durable, LAYER over it
    still answers for those blocks)."""
    await drive(parent.flusher.flush())
    await drive(parent.flusher.finish())
    await set_writable(disk, parent, False)


async def _switch_inner(disk: AsyncDisk, child: DiskCore, layer: DiskCore, parent: DiskCore,
                        op: Operation) -> None:
    """Steps 3 and 4 for an inner LAYER: P durable and frozen again, the child re-pointed, the record without
    LAYER, all while the disk serves (reads through LAYER or through P give the same bytes now); paused only
    for the switch in memory; LAYER's file removed after."""
    with trio.CancelScope(shield=True):
        op.phase = "switching"
        await drive(parent.flusher.flush())
        await drive(parent.flusher.finish())
        await set_writable(disk, parent, False)
        # P's DataWriteGuid is the one chosen at step 1 once anything was copied; still its old one when
        # LAYER held nothing of its own (a checkpoint merged away at once).
        await repoint(disk, child, parent, parent.image.header.data_write_guid)
        chain = [item.path for item in layers(disk) if item is not layer]
        await trio.to_thread.run_sync(record, chain)
        host = disk.host_of(layer)
        async with disk.paused():
            child.parent = parent
            disk.core.chain()
            disk.rebind(disk.core)
        await drop_file(layer, host)


async def _mirror(disk: AsyncDisk, top: DiskCore, parent: DiskCore, op: Operation,
                  progress: Callable[[Operation], None] | None) -> tuple[int, int]:
    """The active top: copy, then copy again what was written meanwhile, then switch paused (steps 2-4)."""
    bs = top.block_size
    dirty: set[int] = set()

    def changed(offset: int, length: int) -> None:
        dirty.update(range(offset // bs, (offset + max(length, 1) - 1) // bs + 1))

    disk.on_change = changed
    try:
        todo, copied, passes = own_blocks(top), 0, 0
        while True:
            passes += 1
            op.phase = f"copying (pass {passes})"
            dirty.clear()
            copied += await copy_down(disk, top, parent, todo, op)
            if progress:
                progress(op)
            todo = sorted(dirty)
            if len(todo) * bs <= SETTLED or passes >= MIRROR_PASSES:
                break
        with trio.CancelScope(shield=True):
            async with disk.paused():
                op.phase = "switching"
                copied += await copy_down(disk, top, parent, sorted(dirty), op)
                disk.on_change = None
                await drive(parent.flusher.flush())  # P holds everything, durably, before the record says so
                chain = [item.path for item in layers(disk) if item is not top]
                await trio.to_thread.run_sync(record, chain)
                host = disk.host_of(top)
                parent.chain()
                disk.rebind(parent)
            await drop_file(top, host)  # no request reaches it now; a crash before leaves an unused file
        return copied, passes + 1
    finally:
        disk.on_change = None
