"""`vhdxfs mount` and `vhdxfs umount`: argument handling, daemonizing, waiting for a clean exit."""

from __future__ import annotations

import argparse
import errno
import grp
import logging
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import trio

from ..engine import absolute_location, location_exists
from ..errors import Reason, UsageError, VhdxError
from ..service.daemon import Ready, daemonize, run_in_foreground
from ..service.records import wait_for_exit
from .daemon import MountConfig, read_state, serve, state_file
from .mounts import FSTYPE, find_mount, is_dead, normalize
from .operations import raw_name

log = logging.getLogger("vhdxfs.mount")
UMOUNT_TIMEOUT = float(os.environ.get("VHDXFS_UMOUNT_TIMEOUT", "600"))
FUSE_DEVICE = "/dev/fuse"
FUSE_CONF = "/etc/fuse.conf"  # where fusermount3 looks for user_allow_other


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
            elif key in ("uid", "gid", "poll_us"):
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
        if not location_exists(image):
            raise UsageError("no such image file", path=image, errno=errno.ENOENT, reason=Reason.NOT_FOUND)
        name = raw_name(image)
        if name in names:
            raise UsageError(f"{image} and {names[name]} would both appear as {name}; rename one", field="IMAGE")
        names[name] = image
    mnt = config.mountpoint
    entry = find_mount(mnt)
    if entry is not None and is_dead(mnt):
        raise VhdxError(f"a dead {entry.fstype} mount is still here (its daemon is gone); remove it first with "
                        f"'vhdxfs umount {mnt}'", path=mnt, errno=errno.ENOTCONN, reason=Reason.EXISTS)
    if entry is not None:
        raise VhdxError(f"already mounted ({entry.fstype} from {entry.source}); unmount it first", path=mnt,
                        errno=errno.EBUSY, reason=Reason.EXISTS)
    if not Path(mnt).is_dir():
        raise VhdxError("mount point does not exist or is not a directory", path=mnt, errno=errno.ENOTDIR,
                        reason=Reason.BAD_ARGUMENT)
    if os.geteuid() != 0:
        check_plain_user(config)


def _owner(st: os.stat_result) -> str:
    try:
        return pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        return str(st.st_uid)


def _group(st: os.stat_result) -> str:
    try:
        return grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        return str(st.st_gid)


def allows_other(conf: bytes) -> bool:
    """Whether fusermount3 finds user_allow_other in fuse.conf: a line of its own, comments ('#') and blanks
    aside, ended by a newline (fusermount3 ignores a last line that has none)."""
    lines = conf.split(b"\n")[:-1]  # the part after the last newline is not a line to fusermount3
    return any(line.split(b"#", 1)[0].strip() == b"user_allow_other" for line in lines)


def check_plain_user(config: MountConfig) -> None:
    """What fusermount3 (or opening the images) would refuse a user other than root, said before anything is
    mounted, with what to do about it: today's failures are only "fuse_session_mount failed" or a bare
    "Permission denied". Root passes all of these, so this is not called for root. Each refusal is the
    host's (its permissions and settings), so its reason is DENIED (or HOST_IO where a device is missing) and
    its errno says which kind."""
    try:
        dev = os.stat(FUSE_DEVICE)
    except FileNotFoundError:
        raise VhdxError("no such device, so nothing can be mounted; an administrator loads the fuse module "
                        "(modprobe fuse)", path=FUSE_DEVICE, errno=errno.ENODEV, reason=Reason.HOST_IO) from None
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        group = _group(dev)
        if dev.st_gid == 0:
            via_group = "give it a group of its own with mode 0660 and add you to that group"
        elif dev.st_mode & 0o060 == 0o060:
            via_group = f"add you to its group {group}"
        else:
            via_group = f"make it 0660 and add you to its group {group}"
        raise VhdxError(f"you may not read and write it ({stat.filemode(dev.st_mode)} {_owner(dev)}:{group}), so "
                        f"FUSE cannot mount for you; an administrator can make it 0666 (as Debian's udev rule "
                        f"does) or {via_group}", path=FUSE_DEVICE, errno=errno.EACCES, reason=Reason.DENIED)
    wants = [opt for opt in ("allow_other", "allow_root")
             if opt in config.fuse_options or (opt == "allow_other" and config.allow_other)]
    if wants:
        try:
            with open(FUSE_CONF, "rb") as f:
                conf = f.read()
        except FileNotFoundError:
            conf = b""
        except OSError as exc:
            raise VhdxError(f"you may not read it ({exc.strerror}), so fusermount3 cannot find user_allow_other "
                            f"there and refuses -o {wants[0]}; an administrator makes it readable (chmod 0644)",
                            path=FUSE_CONF, errno=errno.EACCES, reason=Reason.DENIED) from None
        if not allows_other(conf):
            if allows_other(conf + b"\n"):
                raise VhdxError("its last line, user_allow_other, has no newline at its end, so fusermount3 "
                                "ignores it; an administrator adds the newline", path=FUSE_CONF, errno=errno.EPERM,
                                reason=Reason.DENIED)
            raise VhdxError(f"-o {wants[0]} needs a line 'user_allow_other' here when a user other than root "
                            f"mounts; an administrator adds it (or mount without {wants[0]})", path=FUSE_CONF,
                            errno=errno.EPERM, reason=Reason.DENIED)
    mnt = config.mountpoint
    st = os.stat(mnt)
    if st.st_uid != os.getuid() and st.st_mode & stat.S_ISVTX:
        raise VhdxError(f"mount point is {_owner(st)}'s, not yours, and has the sticky bit set; fusermount3 lets "
                        f"a user other than root mount only on a directory of their own (mkdir one, e.g. ~/mnt)",
                        path=mnt, errno=errno.EPERM, reason=Reason.DENIED)
    if not os.access(mnt, os.W_OK | os.X_OK):
        if st.st_uid == os.getuid():
            raise VhdxError(f"you may not write to this mount point ({stat.filemode(st.st_mode)}), and "
                            f"fusermount3 requires it of a user other than root; chmod u+wx it", path=mnt,
                            errno=errno.EPERM, reason=Reason.DENIED)
        raise VhdxError(f"mount point is {_owner(st)}'s ({stat.filemode(st.st_mode)}), not yours, and you may not "
                        f"write to it; fusermount3 lets a user other than root mount only on a directory they may "
                        f"write (mkdir one of your own, e.g. ~/mnt)", path=mnt, errno=errno.EPERM,
                        reason=Reason.DENIED)
    if not config.read_only:
        for image in config.images:
            if os.access(image, os.R_OK) and not os.access(image, os.W_OK):
                raise VhdxError("you may only read this image; mount it with -o ro (or get write access to it)",
                                path=image, errno=errno.EACCES, reason=Reason.READ_ONLY)


def run_mount(args: argparse.Namespace) -> int:
    # Absolute paths: the daemon changes to / so that it keeps no directory busy.
    config = MountConfig(images=[absolute_location(i) for i in args.images], mountpoint=normalize(args.mountpoint),
                         parent=absolute_location(args.parent) if args.parent else None, debug=args.debug)
    parse_options(args.options, config)
    check_arguments(config)

    def service(ready: Ready) -> None:
        trio.run(serve, config, ready)

    if args.foreground:
        return run_in_foreground(service, args.debug)
    log_file = state_file(config.mountpoint).with_suffix(".log")
    return daemonize(service, what="mount", debug=config.debug, log_file=log_file)


def run_umount(args: argparse.Namespace) -> int:
    mnt = normalize(args.mountpoint)
    entry = find_mount(mnt)
    if entry is None:
        raise UsageError("not mounted", path=mnt)  # EINVAL, as umount(2) says it
    if entry.fstype != FSTYPE:
        raise UsageError(f"not a vhdxfs mount ({entry.fstype} from {entry.source}); use umount(8)", path=mnt)
    dead = is_dead(mnt)
    pid = None if dead else read_state(mnt)
    result = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
    if result.returncode != 0:
        why = result.stderr.strip() or "fusermount3 failed"
        busy = "busy" in why  # fusermount3 says so only in words
        hint = "; a file in it is still open (a loop device? 'losetup -d' it first)" if busy else ""
        raise VhdxError(f"cannot unmount: {why}{hint}", path=mnt, errno=errno.EBUSY if busy else errno.EIO,
                        reason=Reason.HOST_IO)
    if dead:
        state_file(mnt).unlink(missing_ok=True)  # the dead daemon's record
        raise VhdxError("removed a dead mount: its daemon had died, so its images were not closed cleanly "
                        "(a writable open replays their log)", path=mnt, errno=errno.ENOTCONN, reason=Reason.HOST_IO)
    if pid is None:
        print(f"vhdxfs: {mnt}: unmounted, but no daemon was recorded to wait for", file=sys.stderr)
        return 0
    if not wait_for_exit(pid, UMOUNT_TIMEOUT):
        # The images are still the daemon's (locked) when this gives up waiting.
        raise VhdxError(f"unmounted, but daemon {pid} is still closing the images after {UMOUNT_TIMEOUT:.0f} s",
                        path=mnt, errno=errno.ETIMEDOUT, reason=Reason.TIMED_OUT)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "mount", help="mount images as raw files",
        description="Mount each IMAGE as MOUNTPOINT/<stem>.raw (disk.vhdx -> disk.raw). Returns once the mount is "
                    "ready; the daemon runs on in the background unless --foreground. Stop it with "
                    "'vhdxfs umount MOUNTPOINT', fusermount3 -u, or SIGTERM: every image is flushed and closed "
                    "cleanly first. While it runs, 'vhdxfs status', 'checkpoint', 'merge' and 'resize' manage it. "
                    "A writable mount of an image that checkpoints froze opens the top of its chain (still shown "
                    "as <stem>.raw); -o ro opens the image itself, the checkpoint as it was.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="comma-separated: ro, allow_other, uid=N, gid=N (owner shown for the files), poll_us=N "
                        "(microseconds to poll for the next request before sleeping, default 64, 0: never); others "
                        "are passed to FUSE")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr")
    p.add_argument("--parent", metavar="PATH", help="parent of a differencing IMAGE, if it cannot be found")
    p.set_defaults(func=run_mount)
    u = subparsers.add_parser("umount", help="unmount, after every image is flushed and closed",
                              description="Unmount MOUNTPOINT and wait until the daemon has flushed and closed every "
                                          "image, so the images may be copied as soon as this returns.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.set_defaults(func=run_umount)
