"""The control channel's commands over a daemon's running disks, shared by the FUSE mount and the NBD server.

A daemon serves images under names fixed at its start (the mount's raw file ``disk.raw``, the NBD export
``disk``), whatever its chain becomes. ``command_table`` gives the commands of service/control.py over
them; each front end extends the table (the NBD server adds its clients to ``status``, the mount tells the
kernel a raw file's new size after ``resize`` through ``resized``):

- ``status``: the daemon (pid, uptime, kind, key) and per image its chain, I/O counters, write-back queue,
  pending metadata and the live operation running;
- ``checkpoint`` (image, name): the new top; ``checkpoints`` (image): the chain, top first;
- ``merge`` (image, layer): merges a layer into its parent, with ``progress`` events while it copies;
- ``resize`` (image, size, shrink).

``image`` may be left out when the daemon serves one image; it names one by its name, its stem, or the
path of any file of its chain.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ...errors import ParentError, Reason, VhdxError
from ...service.control import Command, Emit
from ...service.control_protocol import Param
from ..aio import AsyncDisk
from ..image.locations import Location, is_remote, real
from .checkpoint import chain_top, checkpoint
from .merge import merge
from .resize import resize
from .state import running
from .status import chain_info, disk_status

PROGRESS_EVERY = 0.25  # seconds between a merge's progress events


@dataclass(frozen=True)
class Served:
    """One image a daemon serves: the name it shows, the image as configured, its running disk."""

    name: str  # the raw file (disk.raw) or export (disk): fixed at start
    image: Location  # as the daemon was told (a checkpoint's base keeps this name; the disk's top moves on)
    disk: AsyncDisk

    def held(self) -> dict[str, Any]:
        """What the pid record says this image holds (service/records.py)."""
        return {"name": self.name, "image": str(self.image), "read-only": self.disk.read_only,
                "layers": [str(path) for path in self.disk.chain()]}


async def opened_paths(images: list[str], read_only: bool) -> list[str]:
    """What a daemon opens for each image it is told to serve: a writable open of a layer that checkpoints
    froze opens the top of its chain (``chain_top``), the daemon keeping the name of the image given; a
    read-only one opens the layer itself (a backup reads a checkpoint while the disk runs). A chain whose
    parents cannot be found here is left to the open (and its --parent) to report."""
    if read_only:
        return list(images)
    out = []
    for image in images:
        if is_remote(image):  # never written: its open refuses a writable use, with what to do instead
            out.append(image)
            continue
        try:
            out.append(str(await trio.to_thread.run_sync(chain_top, image)))
        except ParentError:
            out.append(image)
    return out


def held(served: list[Served]) -> Callable[[], list[dict[str, Any]]]:
    return lambda: [s.held() for s in served]


def pick(served: list[Served], name: str | None) -> Served:
    """The image ``name`` names (its name, stem, image or any layer); the only one when None."""
    if name is None:
        if len(served) == 1:
            return served[0]
        raise VhdxError(f"the daemon serves {len(served)} images ({', '.join(s.name for s in served)}); name one "
                        "(--image NAME, or the raw file)", errno=errno.EINVAL, reason=Reason.BAD_ARGUMENT)
    for s in served:
        if name in (s.name, Path(s.name).stem, s.image.name, s.image.stem, str(s.image)):
            return s
    wanted = real(name)
    for s in served:
        if wanted in (real(s.image), *(real(p) for p in s.disk.chain())):
            return s
    raise VhdxError(f"the daemon serves no image {name!r} (it serves {', '.join(s.name for s in served)})",
                    errno=errno.ENOENT, reason=Reason.NOT_FOUND)


def image_status(s: Served) -> dict[str, Any]:
    return {"name": s.name, "image": str(s.image), **disk_status(s.disk)}


IMAGE = Param("string", help="the image (its raw file or export name, or a file of its chain)")


def command_table(served: list[Served], daemon: Callable[[], dict[str, Any]],
                  resized: Callable[[Served], Awaitable[None]] | None = None) -> dict[str, Command]:
    """The commands over ``served``; ``daemon()`` says who the daemon is (pid, kind, key, uptime); ``resized``
    is awaited after a live resize, before the command answers (the mount invalidates the raw file's size)."""

    async def status(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        chosen = [pick(served, args["image"])] if "image" in args else served
        return {"daemon": daemon(), "images": [image_status(s) for s in chosen]}

    async def do_checkpoint(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        s = pick(served, args.get("image"))
        top = await checkpoint(s.disk, args.get("name"))
        return {"image": s.name, "top": str(top), "chain": [str(p) for p in s.disk.chain()]}

    async def checkpoints(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        s = pick(served, args.get("image"))
        return {"image": s.name, "layers": chain_info(s.disk)}

    async def do_merge(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        s = pick(served, args.get("image"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_report_progress, s.disk, emit)
            result = await merge(s.disk, args["layer"], lambda op: emit("progress", op.snapshot()))
            nursery.cancel_scope.cancel()
        return {"image": s.name, "layer": str(result.layer), "parent": str(result.parent),
                "copied-bytes": result.copied, "passes": result.passes, "chain": [str(p) for p in s.disk.chain()]}

    async def do_resize(args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        s = pick(served, args.get("image"))
        result = await resize(s.disk, args["size"], shrink=args.get("shrink", False))
        if resized is not None:
            await resized(s)
        return {"image": s.name, "old-size": result.old_size, "new-size": result.new_size,
                "bat-moved-to": result.bat_moved_to}

    return {
        "status": Command({"image": IMAGE}, status, "the daemon, and per image its chain, I/O and what runs"),
        "checkpoint": Command({"image": IMAGE, "name": Param("string", help="the new layer's file name")},
                              do_checkpoint, "freeze the top; the disk writes into a new child", changes=True),
        "checkpoints": Command({"image": IMAGE}, checkpoints, "the chain of an image, top first"),
        "merge": Command({"image": IMAGE, "layer": Param("string", True, "the layer to merge into its parent")},
                         do_merge, "merge a layer into its parent (progress events)", changes=True),
        "resize": Command({"image": IMAGE, "size": Param("size", True, "the new virtual size"),
                           "shrink": Param("bool", help="allow a smaller size")},
                          do_resize, "change the virtual size", changes=True),
    }


async def _report_progress(disk: AsyncDisk, emit: Emit) -> None:
    """A progress event every PROGRESS_EVERY seconds while a live operation runs on ``disk``."""
    while True:
        await trio.sleep(PROGRESS_EVERY)
        op = running(disk)
        if op is not None:
            emit("progress", op.snapshot())
