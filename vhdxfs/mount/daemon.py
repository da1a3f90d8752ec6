"""The mount's lifecycle: open the images, mount, serve, and on any way out close everything cleanly.

Ways out: SIGTERM/SIGINT/SIGHUP (we unmount), ``fusermount3 -u`` or ``vhdxfs umount`` (the kernel ends the
session), or the FUSE session failing. Every way ends the same: unmount if still mounted, then flush and
close each image (log applied, LogGuid cleared), then remove the pid record, then exit; ``vhdxfs umount``
waits for that exit. Signals are received for the daemon's whole life, so a second Ctrl-C or a signal
during start-up can never cut a close short. Mount-time failures happen before anything is mounted, or
unmount again, so no stale mount is left behind.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from ..engine.aio import close_disks, open_disks
from ..errors import VhdxError
from ..service.daemon import Ready
from ..service.notify import sd_notify
from ..service.records import read_record, record_path, write_record
from ..service.signals import run_until_stopped
from .mounts import normalize
from .operations import RawFilesOperations

log = logging.getLogger("vhdxfs.mount")


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
    """Where the daemon serving ``mountpoint`` records its pid for ``vhdxfs umount`` (service/records.py)."""
    return record_path(normalize(mountpoint))


def read_state(mountpoint: str | os.PathLike) -> int | None:
    """The pid of the live daemon serving ``mountpoint``, if its record is there and still true."""
    return read_record(state_file(mountpoint), normalize(mountpoint))


def fuse_options(config: MountConfig) -> set[str]:
    fsname = ":".join(config.images).replace(",", "_")  # shows in mount(8), df and /proc/mounts
    opts = {f"fsname={fsname}", "subtype=vhdxfs", "default_permissions", *config.fuse_options}
    if config.read_only:
        opts.add("ro")
    if config.allow_other:
        opts.add("allow_other")
    return opts


@contextlib.contextmanager
def _capture_stderr() -> Iterator[list[str]]:
    """Catch what libfuse prints on fd 2 while mounting ("fuse: unknown option(s): `-o foo'"), so a
    daemon whose stderr is /dev/null can still tell the user why the mount failed, in one line. On
    success the text is passed on to the real stderr; on failure it is only in the lines yielded."""
    lines: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        failed = True
        try:
            yield lines
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            said = (line.strip() for line in text.splitlines())
            lines.extend(line for line in said if line.startswith(("fuse:", "fusermount3:")))
            if text and not failed:
                os.write(2, text.encode())


class _Stop:
    """Shared between the signal watcher and the serving code."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.serving = False


async def serve(config: MountConfig, ready: Ready) -> None:
    """Open, mount, call ``ready(None)`` (or ``ready(message)`` on failure), serve until told to stop."""
    stop = _Stop()

    def on_signal(name: str) -> None:
        """End the FUSE loop gracefully (pyfuse3.terminate lets requests in flight finish)."""
        stop.signal = name
        log.info("%s: unmounting, then closing the images", name)
        if stop.serving:
            pyfuse3.terminate()

    await run_until_stopped(functools.partial(_serve, config, ready, stop), on_signal)


async def _serve(config: MountConfig, ready: Ready, stop: _Stop) -> None:
    try:
        disks = await open_disks(config.images, read_only=config.read_only, parent=config.parent)
    except VhdxError as exc:
        ready(str(exc))
        return
    if stop.signal:
        await close_disks(disks)
        ready(f"{stop.signal} while opening the images; not mounted")
        return
    ops = RawFilesOperations(disks, read_only=config.read_only, uid=config.uid, gid=config.gid)
    # Nothing may touch the mount point once it is mounted and before we serve (not even realpath's lstat):
    # we would wait on ourselves, for ever. So every path is worked out now.
    mountpoint = normalize(config.mountpoint)
    pidfile = state_file(mountpoint)
    try:
        with _capture_stderr() as fuse_said:
            pyfuse3.init(ops, config.mountpoint, fuse_options(config))
    except RuntimeError as exc:
        await close_disks(disks)
        ready(f"{config.mountpoint}: cannot mount: {'; '.join(fuse_said) or exc}")
        return
    try:
        try:
            write_record(pidfile, mountpoint)
        except OSError as exc:
            log.warning("cannot record the daemon pid in %s: %s", pidfile, exc)
        log.info("mounted %s at %s", ", ".join(config.images), config.mountpoint)
        ready(None)
        sd_notify("READY=1\nSTATUS=serving " + ", ".join(config.images))
        stop.serving = True
        if not stop.signal:
            # Ends when a signal asked us to stop, the kernel ended the session (someone unmounted us),
            # or the session failed.
            await pyfuse3.main()
    finally:
        stop.serving = False
        sd_notify("STOPPING=1")
        with trio.CancelScope(shield=True):
            # Always ask: libfuse skips the unmount when the kernel already ended the session (the device
            # fd reports POLLERR), so this never touches a later mount on the same directory, and a loop
            # that ended for any other reason leaves no dead mount behind.
            pyfuse3.close(unmount=True)
            await close_disks(disks)
        pidfile.unlink(missing_ok=True)
