"""The mount daemon: open the images, mount, serve, and on any way out close everything cleanly.

Ways out: SIGTERM/SIGINT/SIGHUP (we unmount), ``fusermount3 -u`` or ``vhdxfs umount`` (the kernel ends the
session), or the FUSE session failing. Every way ends the same: unmount if still mounted, then flush and
close each image (log applied, LogGuid cleared), then remove the pid record, then exit; ``vhdxfs umount``
waits for that exit. The sequence is the one every daemon lives (service/lifecycle.py); this module gives
it what the mount opens: the disks, then the FUSE session. Mount-time failures happen before anything is
mounted, so no stale mount is left behind.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3

from ..engine import parse_location
from ..engine.aio import close_disks, open_disks
from ..engine.live import Served, command_table, held, opened_paths
from ..errors import Reason, VhdxError
from ..service.daemon import Ready
from ..service.lifecycle import Life, Serving, run_daemon
from ..service.records import read_record, record_path
from .control import size_notifier
from .mounts import normalize
from .operations import RawFilesOperations, raw_name


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
    poll_us: int | None = None  # -o poll_us=N: how long the FUSE loop polls for the next request (pyfuse3's 64)


def state_file(mountpoint: str | os.PathLike[str]) -> Path:
    """Where the daemon serving ``mountpoint`` records its pid for ``vhdxfs umount`` (service/records.py)."""
    return record_path(normalize(mountpoint))


def read_state(mountpoint: str | os.PathLike[str]) -> int | None:
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


async def serve(config: MountConfig, ready: Ready) -> None:
    """Open, mount, call ``ready(None)`` (or ``ready(error)`` on failure), serve until told to stop."""
    await run_daemon(ready, functools.partial(_start, config), stop_message="unmounting, then closing the images")


async def _start(config: MountConfig, life: Life) -> Serving:
    """Enter the disks, then the FUSE session, on the daemon's stack (service/lifecycle.py)."""
    paths = await opened_paths(config.images, config.read_only)  # the top of a checkpointed chain
    disks = await open_disks(paths, read_only=config.read_only, parent=config.parent)
    life.on_close(close_disks, disks)
    life.refuse_if_stopping("while opening the images; not mounted")
    names = [raw_name(image) for image in config.images]  # fixed now: a disk's path moves with checkpoints
    ops = RawFilesOperations(disks, read_only=config.read_only, uid=config.uid, gid=config.gid, names=names)
    served = [Served(name, parse_location(image), disk)
              for name, image, disk in zip(names, config.images, disks, strict=True)]
    # Nothing may touch the mount point once it is mounted and before we serve (not even realpath's lstat):
    # we would wait on ourselves, for ever. So every path is worked out now.
    mountpoint = normalize(config.mountpoint)
    record = state_file(mountpoint)
    fuse_said: list[str] = []
    try:
        with _capture_stderr() as fuse_said:
            pyfuse3.init(ops, config.mountpoint, fuse_options(config))
    except RuntimeError as exc:
        raise VhdxError(f"cannot mount: {'; '.join(fuse_said) or exc}", path=config.mountpoint,
                        reason=Reason.HOST_IO) from None
    # Always ask to unmount: libfuse skips it when the kernel already ended the session (the device fd
    # reports POLLERR), so this never touches a later mount on the same directory, and a loop that ended
    # for any other reason leaves no dead mount behind.
    life.callback(pyfuse3.close, unmount=True)
    if config.poll_us is not None and hasattr(pyfuse3, "set_poll_max_ns"):  # the patched build (setup.sh)
        pyfuse3.set_poll_max_ns(config.poll_us * 1000)
    images = ", ".join(config.images)
    # pyfuse3.main ends when a stop terminates it, the kernel ends the session (someone unmounted us), or
    # the session fails.
    return Serving(record=record, key=mountpoint, status=f"serving {images}",
                   announce=f"mounted {images} at {config.mountpoint}", serve=pyfuse3.main,
                   interrupt=pyfuse3.terminate, kind="mount",
                   commands=command_table(served, life.hello, size_notifier(ops)), held=held(served))
