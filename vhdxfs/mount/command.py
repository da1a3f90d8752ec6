"""`vhdxfs mount` and `vhdxfs umount`: argument handling, daemonizing, waiting for a clean exit."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import subprocess
import sys
from pathlib import Path

import trio

from ..errors import UsageError, VhdxError
from ..service.daemon import daemonize, run_in_foreground
from ..service.records import wait_for_exit
from .daemon import MountConfig, read_state, serve, state_file
from .mounts import FSTYPE, find_mount, is_dead, normalize
from .operations import raw_name

log = logging.getLogger("vhdxfs.mount")
UMOUNT_TIMEOUT = float(os.environ.get("VHDXFS_UMOUNT_TIMEOUT", "600"))


def parse_options(text: list[str], config: MountConfig) -> None:
    """-o ro,allow_other,uid=N,gid=N; other options go to FUSE as they are."""
    for group in text:
        for opt in filter(None, group.split(",")):
            key, _, value = opt.partition("=")
            if key == "ro":
                config.read_only = True
            elif key == "rw":
                config.read_only = False
            elif key == "allow_other":
                config.allow_other = True
            elif key in ("uid", "gid"):
                if not value.isdigit():
                    raise UsageError(f"{opt}: {key} takes a number", field="-o")
                setattr(config, key, int(value))
            elif key == "max_read":
                # pyfuse3's init() does not pass it on to libfuse, which then ends the session at once.
                raise UsageError(f"{opt}: not supported (requests are already up to 1 MiB)", field="-o")
            elif key in ("default_permissions", "dev", "suid", "nodev", "nosuid", "exec", "noexec", "auto",
                         "noauto", "_netdev", "nofail", "user", "users"):
                continue  # always on, or meant for mount(8)/fstab, not for us
            else:
                config.fuse_options.append(opt)


def check_arguments(config: MountConfig) -> None:
    names: dict[str, str] = {}
    for image in config.images:
        if not Path(image).is_file():
            raise VhdxError("no such image file", path=image)
        name = raw_name(image)
        if name in names:
            raise UsageError(f"{image} and {names[name]} would both appear as {name}; rename one", field="IMAGE")
        names[name] = image
    mnt = config.mountpoint
    entry = find_mount(mnt)
    if entry is not None and is_dead(mnt):
        raise VhdxError(f"a dead {entry.fstype} mount is still here (its daemon is gone); remove it first with "
                        f"'vhdxfs umount {mnt}'", path=mnt)
    if entry is not None:
        raise VhdxError(f"already mounted ({entry.fstype} from {entry.source}); unmount it first", path=mnt)
    if not Path(mnt).is_dir():
        raise VhdxError("mount point does not exist or is not a directory", path=mnt)


def run_mount(args: argparse.Namespace) -> int:
    # Absolute paths: the daemon changes to / so that it keeps no directory busy.
    config = MountConfig(images=[os.path.abspath(i) for i in args.images], mountpoint=normalize(args.mountpoint),
                         parent=os.path.abspath(args.parent) if args.parent else None, debug=args.debug)
    parse_options(args.options, config)
    check_arguments(config)
    service = functools.partial(trio.run, serve, config)
    if args.foreground:
        return run_in_foreground(service, args.debug)
    log_file = state_file(config.mountpoint).with_suffix(".log")
    return daemonize(service, what="mount", debug=config.debug, log_file=log_file)


def run_umount(args: argparse.Namespace) -> int:
    mnt = normalize(args.mountpoint)
    entry = find_mount(mnt)
    if entry is None:
        raise VhdxError("not mounted", path=mnt)
    if entry.fstype != FSTYPE:
        raise VhdxError(f"not a vhdxfs mount ({entry.fstype} from {entry.source}); use umount(8)", path=mnt)
    dead = is_dead(mnt)
    pid = None if dead else read_state(mnt)
    result = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
    if result.returncode != 0:
        why = result.stderr.strip() or "fusermount3 failed"
        hint = "; a file in it is still open (a loop device? 'losetup -d' it first)" if "busy" in why else ""
        raise VhdxError(f"cannot unmount: {why}{hint}", path=mnt)
    if dead:
        state_file(mnt).unlink(missing_ok=True)  # the dead daemon's record
        raise VhdxError("removed a dead mount: its daemon had died, so its images were not closed cleanly "
                        "(a writable open replays their log)", path=mnt)
    if pid is None:
        print(f"vhdxfs: {mnt}: unmounted, but no daemon was recorded to wait for", file=sys.stderr)
        return 0
    if not wait_for_exit(pid, UMOUNT_TIMEOUT):
        raise VhdxError(f"unmounted, but daemon {pid} is still closing the images after {UMOUNT_TIMEOUT:.0f} s",
                        path=mnt)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "mount", help="mount images as raw files",
        description="Mount each IMAGE as MOUNTPOINT/<stem>.raw (disk.vhdx -> disk.raw). Returns once the mount is "
                    "ready; the daemon runs on in the background unless --foreground. Stop it with "
                    "'vhdxfs umount MOUNTPOINT', fusermount3 -u, or SIGTERM: every image is flushed and closed "
                    "cleanly first.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="comma-separated: ro, allow_other, uid=N, gid=N (owner shown for the files); others are "
                        "passed to FUSE")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr")
    p.add_argument("--parent", metavar="PATH", help="parent of a differencing IMAGE, if it cannot be found")
    p.set_defaults(func=run_mount)
    u = subparsers.add_parser("umount", help="unmount, after every image is flushed and closed",
                              description="Unmount MOUNTPOINT and wait until the daemon has flushed and closed every "
                                          "image, so the images may be copied as soon as this returns.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.set_defaults(func=run_umount)
