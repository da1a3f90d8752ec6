"""Checkpoint a running disk: its top freezes, and the disk goes on writing into a new differencing child.

Hyper-V's way: the new child is ``<base stem>_<GUID>.avhdx`` next to the top (or ``--name``), and the
running disk switches onto it while its users go on. The point in time is crash-consistent: every write
acknowledged before the checkpoint began is in the frozen layer, none issued after it returned is.

Steps, in an order where a crash after any step leaves a chain that opens with every flushed write; only
the switch pauses the disk (new requests wait at its gate, the ones running finish first):

1. the top's DataWriteGuid is fixed for the rest of its life (it is set now if nothing was written yet);
2. the child is created from the top's structures in memory (the top's exclusive lock keeps a second open
   out) and made durable, file and directory entry; a crash now leaves an unused file;
3. the chain record (engine/image/chainrecord.py) names the child as the top: from now on a writable mount
   of any layer opens the child, which reads as the top does (every later write of the top is one the
   child shows through, and its DataWriteGuid no longer changes);
4. the child opens writable, its parent checked (DataWriteGuid, size, sectors) against the top in memory;
5. paused: the disk serves the new chain, the old top named as one its flushes must flush first
   (``AsyncDisk.defer_flush``): no flush of the child returns before every write acknowledged to the old
   top is durable. The pause waits for nothing on the disk (a flush here held a QD1 writer for 30-70 ms,
   and a flush before it, with the write-back queue full, for 100-300 ms);
6. after the pause, no request reaches the old top: it is flushed (its queued writes finish meanwhile;
   the checkpoint returns only after this, so it holds every write acknowledged before it began), its log
   is applied and cleared, and it freezes: its lock turns shared on the same descriptor (so a backup may
   open it read-only at once, and no writer can take it in between) and its write-back queue stops.
   A crash before the flush loses only writes no flush covered, as any crash does.

A failure before the switch undoes what was done (the record, the file) and the disk goes on as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from ...errors import Reason, VhdxError
from ...format import guids
from ..aio import AsyncDisk
from ..aio.drive import drive
from ..disk.core import DiskCore
from ..image import chainrecord
from ..image.loader import VhdxFile
from ..image.locations import Location, local
from ..image.parents import check_parent
from ..ops.create import create_child_of
from .layers import base, layers, record, set_writable
from .state import exclusive


def checkpoint_path(top: Path, stem: str, name: str | None) -> Path:
    """Where a checkpoint's new child goes: next to the top, Hyper-V's ``<stem>_<GUID>.avhdx`` or
    ``<name>.avhdx``."""
    if name:
        if "/" in name or name in (".", ".."):
            raise VhdxError(f"checkpoint name {name!r} must be a plain file name", path=top,
                            reason=Reason.BAD_ARGUMENT)
        file = name if name.endswith(".avhdx") else f"{name}.avhdx"
    else:
        file = f"{stem}_{str(guids.new_guid()).upper()}.avhdx"
    path = top.parent / file
    if path.exists():
        raise VhdxError("already exists; choose another checkpoint name", path=path, reason=Reason.EXISTS)
    return path


async def checkpoint(disk: AsyncDisk, name: str | None = None) -> Path:
    """Take a checkpoint of the running ``disk``; the path of the new top it now writes into."""
    with exclusive(disk, "checkpoint", str(disk.path)) as op:
        top = disk.core
        path = checkpoint_path(local(top.path, "a checkpoint"), base(disk).path.stem, name)
        chain: list[Location] = [layer.path for layer in layers(disk)]
        with trio.CancelScope(shield=True):  # begun, it finishes or undoes itself
            op.phase = "preparing"
            child = await _prepare(disk, top, path, chain)
            try:
                async with disk.paused():
                    op.phase = "switching"
                    child.chain()
                    disk.rebind(child)
                    # The frozen layer must hold every write acknowledged before, durably before any later
                    # flush of the child returns: the disk's flushes flush it first until it is flushed.
                    disk.defer_flush(top)
            except BaseException:
                child.image.close()
                await trio.to_thread.run_sync(_undo, chain, path)
                raise
            op.phase = "freezing"
            await disk.flush_deferred()  # no request reaches the old top now; its queued writes finish meanwhile
            await drive(top.flusher.finish())
            await set_writable(disk, top, False)
        return path


async def _prepare(disk: AsyncDisk, top: DiskCore, path: Path, chain: list[Location]) -> DiskCore:
    """Steps 1 to 4 while the disk serves: the top's contents fixed (its DataWriteGuid), the child created
    over it, recorded as the top, opened writable. Only the switch then pauses the disk."""
    if not top.headers.data_writes_begun:
        await trio.to_thread.run_sync(top.headers.begin_data_writes)  # the DataWriteGuid the child links to
    await trio.to_thread.run_sync(create_child_of, path, top.image)
    try:
        await trio.to_thread.run_sync(record, [path, *chain])
        return await trio.to_thread.run_sync(_open_child, path, top)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_undo, chain, path)
        raise


def _open_child(path: Path, top: DiskCore) -> DiskCore:
    image = VhdxFile.open(path)
    try:
        check_parent(image.path, image.metadata, top.path, top.image.metadata, top.image.header.data_write_guid)
    except BaseException:
        image.close()
        raise
    return DiskCore(image, top)


def _undo(chain: list[Location], path: Path) -> None:
    """The record as it was (blocking; a record never written is written again as it was), no child."""
    record(chain)
    path.unlink(missing_ok=True)


def chain_top(path: str | os.PathLike[str]) -> Path:
    """What a writable mount or serve of ``path`` opens: the top of its chain (engine/image/chainrecord.py)."""
    return chainrecord.top_of(path, chainrecord.base_of(path))
