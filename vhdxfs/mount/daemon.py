"""The mount's lifecycle: open the images, mount, serve, and on any way out close everything cleanly.

Ways out: SIGTERM/SIGINT/SIGHUP (we unmount), ``fusermount3 -u`` or ``vhdxfs umount`` (the kernel ends the
session). Either way the images are flushed and closed (log applied, LogGuid cleared) before the process
exits; ``vhdxfs umount`` waits for that exit. Mount-time failures happen before anything is mounted, or
unmount again, so no stale mount is left behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from ..engine.disk import VirtualDisk
from ..errors import VhdxError
from .notify import sd_notify
from .operations import RawFilesOperations

log = logging.getLogger("vhdxfs.mount")
STATE_DIR = Path(os.environ.get("VHDXFS_STATE_DIR", "/run/vhdxfs"))


@dataclass
class MountConfig:
    images: list[str]
    mountpoint: str
    read_only: bool = False
    allow_other: bool = False
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    parent: str | None = None
    fuse_options: list[str] = field(default_factory=list)
    debug: bool = False


def state_file(mountpoint: str | os.PathLike) -> Path:
    """Where the daemon serving ``mountpoint`` records its pid (for ``vhdxfs umount``)."""
    key = hashlib.sha1(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return STATE_DIR / f"{key}.pid"


def fuse_options(config: MountConfig) -> set[str]:
    fsname = ",".join(config.images).replace(",", "_")  # shows in mount(8) and /proc/mounts
    opts = {f"fsname={fsname}", "subtype=vhdxfs", "default_permissions", *config.fuse_options}
    if config.read_only:
        opts.add("ro")
    if config.allow_other:
        opts.add("allow_other")
    return opts


async def open_disks(config: MountConfig) -> list[VirtualDisk]:
    disks: list[VirtualDisk] = []
    try:
        for image in config.images:
            disks.append(await VirtualDisk.open(image, read_only=config.read_only, parent=config.parent))
    except BaseException:
        for disk in disks:
            await disk.close()
        raise
    return disks


async def close_disks(disks: list[VirtualDisk]) -> None:
    for disk in disks:
        try:
            await disk.close()
            log.info("%s: closed cleanly", disk.path)
        except VhdxError as exc:
            log.error("%s: could not close cleanly: %s", disk.path, exc)


async def serve(config: MountConfig, ready) -> None:
    """Open, mount, call ``ready(None)`` (or ``ready(message)`` on failure), serve until told to stop."""
    try:
        disks = await open_disks(config)
    except VhdxError as exc:
        ready(str(exc))
        return
    ops = RawFilesOperations(disks, read_only=config.read_only, uid=config.uid, gid=config.gid)
    # Nothing may touch the mount point once it is mounted and before we serve: we would wait on ourselves.
    pidfile = state_file(config.mountpoint)
    real_mountpoint = os.path.realpath(config.mountpoint)
    try:
        pyfuse3.init(ops, config.mountpoint, fuse_options(config))
    except RuntimeError as exc:
        await close_disks(disks)
        ready(f"{config.mountpoint}: cannot mount ({exc}); is it a directory you may mount on, not in use?")
        return
    unmount = True
    try:
        try:
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            pidfile.write_text(f"{os.getpid()}\n{real_mountpoint}\n")
        except OSError as exc:
            log.warning("cannot record the daemon pid in %s: %s", pidfile, exc)
        stop = _Stop()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signals, stop)
            log.info("mounted %s at %s", ", ".join(config.images), config.mountpoint)
            ready(None)
            sd_notify("READY=1\nSTATUS=serving " + ", ".join(config.images))
            await pyfuse3.main()
            # The loop ends when a signal asked us to stop (we unmount) or the kernel ended the session
            # (someone unmounted us).
            unmount = stop.requested
            nursery.cancel_scope.cancel()
    finally:
        sd_notify("STOPPING=1")
        with trio.CancelScope(shield=True):
            pyfuse3.close(unmount=unmount)
            await close_disks(disks)
        pidfile.unlink(missing_ok=True)


class _Stop:
    requested = False


async def _stop_on_signals(stop: _Stop) -> None:
    """SIGTERM, SIGINT, SIGHUP: end the FUSE loop gracefully (requests in flight finish first)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            stop.requested = True
            pyfuse3.terminate()
            return
