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
from .daemon import MountConfig, serve, state_file
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
                    raise UsageError(f"-o {opt}: {key} takes a number", field="-o")
                setattr(config, key, int(value))
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
    mnt = Path(config.mountpoint)
    if not mnt.is_dir():
        raise VhdxError("mount point does not exist or is not a directory", path=mnt)
    if os.path.ismount(mnt):
        raise VhdxError("something is already mounted here", path=mnt)


def setup_logging(foreground: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    if foreground or not Path("/dev/log").exists():
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vhdxfs[%(process)d]: %(levelname)s: %(message)s"))
    else:
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("vhdxfs[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def run_mount(args: argparse.Namespace) -> int:
    config = MountConfig(images=[os.path.abspath(i) for i in args.images], mountpoint=os.path.abspath(args.mountpoint),
                         parent=args.parent, debug=args.debug)
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
    # Child: a session of its own, no terminal, logging to syslog.
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    setup_logging(False, config.debug)

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
    os._exit(code)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def run_umount(args: argparse.Namespace) -> int:
    mnt = os.path.abspath(args.mountpoint)
    pid = None
    record = state_file(mnt)
    try:
        pid = int(record.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    if not os.path.ismount(mnt):
        raise VhdxError("not mounted", path=mnt)
    result = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
    if result.returncode != 0:
        raise VhdxError(f"cannot unmount: {result.stderr.strip() or 'fusermount3 failed'}", path=mnt)
    if pid is None:
        print(f"vhdxfs: {mnt}: unmounted, but no daemon was recorded to wait for", file=sys.stderr)
        return 0
    deadline = time.monotonic() + UMOUNT_TIMEOUT
    while _pid_alive(pid):
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
