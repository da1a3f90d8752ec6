"""The FUSE contenders: context managers that serve an image as a raw file and yield its path.

Each one is started fresh for a visit and stopped (unmounted) when the visit ends, whatever happened, so
that no daemon of one contender runs beside the next one's jobs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from .baseline import Baseline, vhdxfs_cmd
from .procs import (
    HERE,
    PYTHON,
    REPO,
    Unavailable,
    force_unmount,
    is_mounted,
    log,
    run,
    spawn,
    stop,
    wait_for,
)


@contextlib.contextmanager
def vhdxfs(image: Path, mnt: Path, base: Baseline | None = None, options: str | None = None) -> Iterator[Path]:
    """vhdxfs mount/umount: this repo's (vhdxfs_bin), or with base the code of another checkout (both);
    ``options``: mount -o OPTIONS."""
    cmd, how = vhdxfs_cmd(base)
    mnt.mkdir(exist_ok=True)
    run(*cmd, "mount", *(["-o", options] if options else []), image, mnt, timeout=120, **how)
    try:
        if base:
            base.daemon(mnt)
        raw = mnt / (image.stem + ".raw")
        if not raw.exists():
            raise Unavailable(f"vhdxfs mount gave no {raw.name}")
        yield raw
    finally:
        try:
            run(*cmd, "umount", mnt, timeout=300, **how)
        except Unavailable as exc:
            log(f"vhdxfs umount: {exc}; unmounting lazily")
            force_unmount(mnt)


def vhdxfs_pid(mnt: Path) -> int:
    """The daemon serving mnt: from its state file (vhdxfs.mount.daemon), else by its command line."""
    with contextlib.suppress(Exception):
        sys.path.insert(0, str(REPO))
        from vhdxfs.mount.daemon import state_file

        return int(state_file(mnt).read_text().split()[0])
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if proc.name.isdigit() and any(b"vhdxfs" in a for a in argv[:3]) and str(mnt).encode() in argv:
                return int(proc.name)
    raise Unavailable("cannot find the vhdxfs daemon's pid")


def qsd_start(image: Path, work: Path, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    """qemu-storage-daemon exporting image over FUSE on the regular file work/<name>.raw."""
    target = work / f"{name}.raw"
    target.touch()  # a FUSE export mounts over an existing regular file
    try:
        proc = spawn(["qemu-storage-daemon",
                      "--blockdev", f"driver=file,node-name=file,filename={image},cache.direct=off",
                      "--blockdev", "driver=vhdx,node-name=disk,file=file",
                      "--export", f"type=fuse,id=exp,node-name=disk,mountpoint={target},writable=on,allow-other=off"],
                     work / f"{name}.log")
    except FileNotFoundError:
        raise Unavailable("qemu-storage-daemon is not installed") from None
    try:
        wait_for(lambda: proc.poll() is not None or is_mounted(target), "qemu-storage-daemon's export")
        if proc.poll() is not None:
            said = (work / f"{name}.log").read_text().strip() or f"exit status {proc.returncode}"
            raise Unavailable(f"qemu-storage-daemon: {said}")
    except BaseException:
        stop(proc)
        raise
    return proc, target


def qsd_stop(proc: subprocess.Popen[bytes], target: Path) -> None:
    stop(proc)
    if is_mounted(target):
        force_unmount(target)


@contextlib.contextmanager
def qsd(image: Path, work: Path) -> Iterator[Path]:
    """QEMU's C vhdx driver behind qemu-storage-daemon's FUSE export."""
    proc, target = qsd_start(image, work, "qsd")
    try:
        yield target
    finally:
        qsd_stop(proc, target)


@contextlib.contextmanager
def vhdimount(image: Path, work: Path) -> Iterator[Path]:
    """libvhdi's FUSE mount (read-only)."""
    mnt = work / "mnt-vhdi"
    mnt.mkdir(exist_ok=True)
    run("vhdimount", image, mnt, timeout=60)  # daemonises once mounted
    try:
        raw = mnt / "vhdi1"
        if not raw.exists():
            raise Unavailable("vhdimount gave no vhdi1")
        yield raw
    finally:
        if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode != 0:
            force_unmount(mnt)


@contextlib.contextmanager
def passthrough(raw_file: Path, work: Path, io: str = "hostfile") -> Iterator[Path]:
    """benchmarks/passthrough.py over a sparse raw file: the ceiling of a pyfuse3 + trio daemon."""
    mnt = work / f"mnt-pt-{io}"
    mnt.mkdir(exist_ok=True)
    proc = spawn([PYTHON, HERE / "passthrough.py", "--io", io, raw_file, mnt], work / "passthrough.log",
                 env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        wait_for(lambda: proc.poll() is not None or is_mounted(mnt), "passthrough.py to mount")
        if proc.poll() is not None:
            said = (work / "passthrough.log").read_text().strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(f"passthrough.py exited {proc.returncode}: {said[0]}")
        yield mnt / "disk.raw"
    finally:
        stop(proc)  # it unmounts on SIGTERM
        if is_mounted(mnt):
            force_unmount(mnt)
