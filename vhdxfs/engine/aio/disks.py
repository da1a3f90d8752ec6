"""Opening and closing the images a daemon serves, all or none."""

from __future__ import annotations

import logging
import os

import trio

from .asyncdisk import AsyncDisk

log = logging.getLogger("vhdxfs")


async def open_disks(paths: list[str], *, read_only: bool = False,
                     parent: str | os.PathLike[str] | None = None) -> list[AsyncDisk]:
    """Open every image (a daemon serves several); if one fails, the ones opened are closed again."""
    disks: list[AsyncDisk] = []
    try:
        for path in paths:
            disks.append(await AsyncDisk.open(path, read_only=read_only, parent=parent))
    except BaseException:
        with trio.CancelScope(shield=True):
            await close_disks(disks)
        raise
    return disks


async def close_disks(disks: list[AsyncDisk]) -> None:
    """Close each image cleanly; one failing to close does not keep the others from closing."""
    for disk in disks:
        try:
            await disk.close()
            log.info("%s: closed cleanly", disk.path)
        except Exception as exc:
            log.error("%s: could not close cleanly: %s", disk.path, exc)
