"""`vhdxfs mount` and `vhdxfs umount`: argument handling, daemonizing, waiting for a clean exit."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import subprocess
import sys
import time
from pathlib import Path

import trio

from ..errors import UsageError, VhdxError
from .daemon import MountConfig, process_start_time, read_state, serve, state_file
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


class _FallbackLog(logging.FileHandler):
    """The log file of a daemon without syslog; removed after a clean life with nothing worth reading, so
    /run does not fill with one file per mount ever made. Kept when it already held an earlier daemon's
    lines (say, the last words of one that was killed)."""

    worst = logging.NOTSET

    def __init__(self, path: Path) -> None:
        self.inherited = path.exists() and path.stat().st_size > 0
        super().__init__(path)

    def emit(self, record: logging.LogRecord) -> None:
        self.worst = max(self.worst, record.levelno)
        super().emit(record)

    def discard_if_boring(self) -> None:
        if self.worst < logging.WARNING and not self.inherited:
            self.close()
            Path(self.baseFilename).unlink(missing_ok=True)


def setup_logging(foreground: bool, debug: bool, log_file: Path | None = None) -> None:
    """stderr in the foreground; syslog for a daemon, or ``log_file`` where there is no syslog (a
    container without /dev/log), so a daemon's warnings are never silently lost."""
    level = logging.DEBUG if debug else logging.INFO
    handler: logging.Handler
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vhdxfs[%(process)d]: %(levelname)s: %(message)s"))
    elif Path("/dev/log").exists():
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("vhdxfs[%(process)d]: %(message)s"))
    else:
        handler = logging.NullHandler()
        if log_file is not None:
            try:
                log_file.parent.mkdir(parents=True, exist_ok=True)
                handler = _FallbackLog(log_file)
            except OSError:
                pass
        handler.setFormatter(logging.Formatter("%(asctime)s vhdxfs[%(process)d]: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def run_mount(args: argparse.Namespace) -> int:
    # Absolute paths: the daemon changes to / so that it keeps no directory busy.
    config = MountConfig(images=[os.path.abspath(i) for i in args.images], mountpoint=normalize(args.mountpoint),
                         parent=os.path.abspath(args.parent) if args.parent else None, debug=args.debug)
    parse_options(args.options, config)
    check_arguments(config)
    if args.foreground:
        setup_logging(True, args.debug)
        failure: list[str] = []

        def ready(message: str | None) -> None:
            if message:
                failure.append(message)

        trio.run(serve, config, ready)
        if failure:
            raise VhdxError(failure[0])
        return 0
    return _daemonize(config)


def _daemonize(config: MountConfig) -> int:
    """Fork; the child serves, the parent waits until the mount is ready (exit 0) or has failed (exit 1)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message.startswith("ok"):
            return 0
        if not message:
            _, status = os.waitpid(pid, 0)
            message = f"the mount daemon died (status {status}) before the mount was ready"
        raise VhdxError(message.removeprefix("error:").strip())
    # Child: a session of its own, no terminal, no busy working directory, logging to syslog.
    os.close(read_fd)
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
    setup_logging(False, config.debug, state_file(config.mountpoint).with_suffix(".log"))

    def ready(message: str | None) -> None:
        nonlocal write_fd
        if write_fd < 0:
            return
        os.write(write_fd, b"ok\n" if message is None else b"error:" + message.encode())
        os.close(write_fd)
        write_fd = -1

    code = 0
    try:
        trio.run(serve, config, ready)
    except BaseException as exc:  # the daemon's last words go to the log, and to the parent if it waits
        log.exception("daemon failed")
        ready(f"mount daemon failed: {exc}")
        code = 1
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _FallbackLog) and code == 0:
            handler.discard_if_boring()
    os._exit(code)


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
    deadline = time.monotonic() + UMOUNT_TIMEOUT
    while process_start_time(pid) is not None:  # exited (a zombie counts as exited: it has closed all)
        if time.monotonic() > deadline:
            raise VhdxError(f"unmounted, but daemon {pid} is still closing the images after {UMOUNT_TIMEOUT:.0f} s",
                            path=mnt)
        time.sleep(0.02)
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
