"""Resize a running disk (grow; shrink only where nothing lies past the new end, as offline).

As Hyper-V's Resize-VHD on a running VM, and refused the same way while the chain has checkpoints: a
differencing layer must keep its parent's size (its parent's sectors show through it), so every layer
would have to change together. Merge the checkpoints first.

Paused: the top is flushed and its log applied; the offline resize (engine/ops/resize.py) runs on the very
open file (its exclusive lock is never let go), through the image's log; its structures are then loaded
afresh from the same open file, and the disk serves them. Space freed by discards before the resize stays
free for reuse (a resize never moves a block into a hole: a moved BAT goes to the end of the file).
"""

from __future__ import annotations

import trio

from ...errors import Reason, VhdxError
from ..aio import AsyncDisk
from ..aio.drive import drive
from ..disk.core import DiskCore
from ..image.loader import VhdxFile
from ..ops.resize import ResizeResult, resize_image
from .layers import layers
from .state import exclusive


async def resize(disk: AsyncDisk, size: int, *, shrink: bool = False) -> ResizeResult:
    """Give the running ``disk`` the virtual size ``size`` (bytes); below the current size only with
    ``shrink``. Front ends tell their users (FUSE: the file's size; NBD: new connections)."""
    chain = layers(disk)
    if len(chain) > 1:
        names = ", ".join(layer.path.name for layer in chain[:-1])
        raise VhdxError(f"the disk has {len(chain) - 1} checkpoint layer(s) over its base ({names}); a "
                        "differencing layer keeps its parent's size, so merge the checkpoints first "
                        "(vhdxfs merge), as Hyper-V requires", path=disk.path, reason=Reason.UNSUPPORTED)
    with exclusive(disk, "resize", str(size)) as op:
        top = disk.core
        async with disk.paused():
            with trio.CancelScope(shield=True):
                op.phase = "flushing"
                await drive(top.flusher.flush())
                await drive(top.flusher.finish())
                op.phase = "resizing"
                result = await trio.to_thread.run_sync(resize_image, top.image, size, shrink)
                if result.old_size != result.new_size:
                    fresh = await trio.to_thread.run_sync(_reload, top)
                    fresh.chain()
                    disk.rebind(fresh)
        return result


def _reload(old: DiskCore) -> DiskCore:
    """The layer of ``old``'s open file, loaded afresh (blocking); its reusable space carried over."""
    image = VhdxFile.load(old.image.host)
    layer = DiskCore(image, None)
    layer.allocation.allocator.free = old.allocation.allocator.free
    return layer
