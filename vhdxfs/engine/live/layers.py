"""What every live operation does to the layers of a running chain: find one, change its mode, re-point its
parent locator, record the chain, copy a layer's own contents into its parent.

All of it runs while the disk serves; what must not overlap requests runs inside ``AsyncDisk.paused``
(the callers say where). Blocking work (lock changes, logged updates, stopping a write-back thread) goes
to a worker thread.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import trio

from ...errors import Reason, VhdxError
from ...format import guids
from ...format.bat import PayloadState
from ..aio import AsyncDisk, AsyncHost
from ..aio.drive import drive
from ..disk.chain import freeze, thaw
from ..disk.core import DiskCore
from ..disk.runs import Kind
from ..image import chainrecord
from ..image.locations import Location, local, real
from ..ops.commit import locator_pages, write_logged
from ..ops.create import parent_locator_for
from .state import Operation

COPY_PIECE = 4 << 20  # bytes read and written at a time by a merge's copy


def layers(disk: AsyncDisk) -> list[DiskCore]:
    """The running chain, top first."""
    return disk.core.layers()


def base(disk: AsyncDisk) -> DiskCore:
    return layers(disk)[-1]


def find_layer(disk: AsyncDisk, name: str | os.PathLike[str]) -> int:
    """The place (0: the top) of the layer ``name`` names: its path, file name or stem."""
    chain = layers(disk)
    wanted = real(name)
    for i, layer in enumerate(chain):
        if wanted == real(layer.path):
            return i
    for i, layer in enumerate(chain):
        if str(name) in (layer.path.name, layer.path.stem):
            return i
    names = ", ".join(layer.path.name for layer in chain)
    raise VhdxError(f"{name} is not a layer of the running chain ({names})", path=disk.path, errno=errno.ENOENT,
                    reason=Reason.NOT_FOUND)


def record(paths: list[Location]) -> None:
    """Record the chain of ``paths`` (top first) beside its base, or beside its lowest local layer over a base
    in an object store: what a writable open of any layer opens (blocking)."""
    local_layers = [p for p in paths if isinstance(p, Path)]
    chainrecord.write_layers(local_layers[-1], local_layers[::-1])


async def set_writable(disk: AsyncDisk, layer: DiskCore, writable: bool,
                       data_write_guid: uuid.UUID | None = None) -> None:
    """Thaw (writable: the lock turns exclusive, a write-back queue starts) or freeze a layer of the chain."""
    host = disk.host_of(layer)

    def change() -> None:
        if writable:
            thaw(layer, data_write_guid or guids.new_guid())
        else:
            freeze(layer)
        host.set_writable(writable)

    await trio.to_thread.run_sync(change)


async def repoint(disk: AsyncDisk, child: DiskCore, parent: DiskCore, linkage: uuid.UUID) -> None:
    """Make ``child``'s parent locator name ``parent`` (found by path, linked by ``linkage``)."""
    await write_locator(disk, child, parent_locator_for(child.path, parent.path, linkage).entries)


async def write_locator(disk: AsyncDisk, layer: DiskCore, entries: dict[str, str]) -> None:
    """Replace ``layer``'s parent locator entries, durably, in one log entry: through the daemon's own log
    when ``layer`` is the top it writes, else through the layer's log while it is made writable for it
    (metadata only: its DataWriteGuid stays). Safe while the disk serves: nothing reads a locator after
    the chain is open."""
    if layer.depth == 0:
        pages = await trio.to_thread.run_sync(locator_pages, layer.image, entries)
        await drive(layer.flusher.flush(extra=pages))
        return
    await set_writable(disk, layer, True)
    try:
        def write() -> None:
            write_logged(layer.image, locator_pages(layer.image, entries))

        await trio.to_thread.run_sync(write)
    finally:
        await set_writable(disk, layer, False)


def own_blocks(layer: DiskCore) -> list[int]:
    """The payload blocks ``layer`` answers for itself (anything but NOT_PRESENT): what a merge copies down."""
    g = layer.geometry
    out = []
    for index, e in layer.bat.holding():
        if e & 7 != PayloadState.NOT_PRESENT and not g.is_bitmap_index(index):
            block = g.block_of_index(index)
            if block < g.data_blocks:
                out.append(block)
    return out


async def copy_down(disk: AsyncDisk, src: DiskCore, dst: DiskCore, blocks: list[int], op: Operation,
                    stop: Callable[[], bool] = lambda: False) -> int:
    """Copy what ``src`` holds itself in ``blocks`` (its DATA, and its zeros) into ``dst``, its parent,
    through the disk (so every read is guarded and every write journaled like a guest's); the bytes done."""
    bs, size = src.block_size, src.size
    done = 0
    for block in blocks:
        if stop():
            break
        start = block * bs
        n = min(bs, size - start)
        runs = await drive(src.translator.translate_loading(src.io, start, n))
        for run in runs:
            if run.kind == Kind.DATA:
                for pos in range(run.offset, run.offset + run.length, COPY_PIECE):
                    m = min(COPY_PIECE, run.offset + run.length - pos)
                    data = await disk.read_layer(src, pos, m)
                    await disk.write_layer(dst, pos, memoryview(data))
            elif run.kind == Kind.ZERO:
                await disk.zero_layer(dst, run.offset, run.length, True)
        done += n
        op.done += n
    return done


async def drop_file(layer: DiskCore, host: AsyncHost) -> None:
    """Remove a layer that left the chain: its name goes (durably), then its open file (call after
    ``rebind``, so no request reaches it; ``host`` is the layer's, taken before)."""

    def remove() -> None:
        try:
            path = local(layer.path, "removing a merged layer")
            path.unlink()
            folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        finally:
            host.stop_writeback()
            layer.image.close()

    await trio.to_thread.run_sync(remove)
