"""Checkpoint a running disk: its top freezes, and the disk goes on writing into a new differencing child.

Hyper-V's way: the new child is ``<base stem>_<GUID>.avhdx`` next to the top (or ``--name``), and the
running disk switches onto it while its users go on. The point in time is crash-consistent: every write
acknowledged before the checkpoint began is in the frozen layer, none issued after it returned is.

Steps, all while the disk is paused (new requests wait at its gate, the ones running finish first), in an
order where a crash after any step leaves a chain that opens with every flushed write:

1. the top is flushed and its log applied (a clean, durable image: what the checkpoint holds);
2. the child is created from the top's structures in memory (the top's exclusive lock keeps a second open
   out) and made durable, file and directory entry; a crash now leaves an unused file;
3. the chain record (engine/image/chainrecord.py) names the child as the top: from now on a writable mount
   of any layer opens the child, which reads as the frozen top did;
4. the child opens writable, its parent checked (DataWriteGuid, size, sectors) against the top in memory;
5. the top freezes: its lock turns shared on the same descriptor (so a backup may open it read-only at
   once, and no writer can take it in between) and its write-back queue stops;
6. the disk serves the new chain.

A failure before 6 undoes what was done (the record, the file, the freeze) and the disk goes on as it was.
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
        async with disk.paused():
            with trio.CancelScope(shield=True):  # begun, it finishes or undoes itself
                op.phase = "flushing"
                await drive(top.flusher.flush())
                await drive(top.flusher.finish())
                op.phase = "switching"
                child = await _new_top(disk, top, path)
                child.chain()
                disk.rebind(child)
        return path


async def _new_top(disk: AsyncDisk, top: DiskCore, path: Path) -> DiskCore:
    """Steps 2 to 5: the child's layer, opened writable over the frozen ``top``."""
    chain: list[Location] = [layer.path for layer in layers(disk)]
    await trio.to_thread.run_sync(create_child_of, path, top.image)
    done: list[str] = []
    try:
        await trio.to_thread.run_sync(record, [path, *chain])
        done.append("record")
        child = await trio.to_thread.run_sync(_open_child, path, top)
        done.append("opened")
        try:
            await set_writable(disk, top, False)
        except BaseException:
            child.image.close()
            raise
        return child
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_undo, chain, path, "record" in done)
        raise


def _open_child(path: Path, top: DiskCore) -> DiskCore:
    image = VhdxFile.open(path)
    try:
        check_parent(image.path, image.metadata, top.path, top.image.metadata, top.image.header.data_write_guid)
    except BaseException:
        image.close()
        raise
    return DiskCore(image, top)


def _undo(chain: list[Location], path: Path, recorded: bool) -> None:
    if recorded:
        record(chain)
    path.unlink(missing_ok=True)


def chain_top(path: str | os.PathLike[str]) -> Path:
    """What a writable mount or serve of ``path`` opens: the top of its chain (engine/image/chainrecord.py)."""
    return chainrecord.top_of(path, chainrecord.base_of(path))
