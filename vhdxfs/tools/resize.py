"""`vhdxfs resize TARGET SIZE [--shrink]`: change the virtual size, keeping the data; live through the
daemon when TARGET names a running disk (tools/target.py), offline when it is an image file nobody holds.

How a resize stays crash safe (new BAT entries first, then one log entry that switches the region table
and the disk size together) is the engine's business: engine/ops/resize.py; live, the same runs paused on
the daemon's open file (engine/live/resize.py). After a live resize of a mounted disk the daemon has told
the kernel the raw file's new size before it answers; this command checks it with a stat, so a script may
run `losetup -c` or QEMU's block_resize as soon as it returns. An NBD client sees the new size on its next
connection.
"""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

from ..engine import resize
from ..errors import Reason, UsageError, VhdxError
from ..sizes import format_size, parse_size
from .live import call
from .target import Target, find, parse_address


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "resize", help="change the virtual size of an image",
        description="Grow (or with --shrink, shrink) the virtual disk of TARGET to SIZE (binary suffixes: 512M, "
                    "10G), keeping its data. SIZE must be a multiple of the logical sector size. TARGET is an image "
                    "file nobody uses (offline), or a running disk: a raw file in a mount, a mount point, an NBD "
                    "socket or address, or an image a daemon holds; then the daemon resizes it while it serves, "
                    "and the raw file has its new size when this returns (losetup -c, QEMU's block_resize); NBD "
                    "clients see it when they connect again. Every change goes through the image's log, so a "
                    "crash leaves either the old or the new size. Shrinking is refused when a block past the new "
                    "end holds data. Differencing images cannot be resized (a child has its parent's size), nor a "
                    "running disk with checkpoints (merge them first), and children of an image stop matching it, "
                    "as its DataWriteGuid changes.")
    p.add_argument("image", metavar="TARGET", help="an image file, or a running disk")
    p.add_argument("size", metavar="SIZE", help="the new virtual size")
    p.add_argument("--shrink", action="store_true", help="allow a size smaller than the current one")
    p.add_argument("--image", dest="served", metavar="NAME", help="which image, when the daemon serves several")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        new_size = parse_size(args.size, "SIZE")
    except UsageError as exc:
        raise exc.with_path(args.image) from None
    named = os.path.lexists(args.image) or parse_address(args.image) is not None
    target = find(args.image, args.served) if named else None  # else the offline resize says "no such file"
    if target is not None:
        return _live(target, new_size, args.shrink)
    result = resize(args.image, new_size, shrink=args.shrink)
    if result.old_size == result.new_size:
        print(f"{args.image}: already {format_size(result.new_size)}; nothing to do")
        return 0
    moved = f"; BAT moved to offset {result.bat_moved_to}" if result.bat_moved_to is not None else ""
    print(f"resized {args.image}: {format_size(result.old_size)} -> {format_size(result.new_size)}{moved}")
    return 0


def _live(target: Target, size: int, shrink: bool) -> int:
    answer = call(target, "resize", {"size": size, "shrink": shrink})
    old, new = answer["old-size"], answer["new-size"]
    raw = target.raw
    if raw is None and target.holder.kind == "mount" and target.image is not None:
        raw = Path(target.holder.key) / target.image["name"]
    if raw is not None:
        seen = os.stat(raw).st_size
        if seen != new:
            raise VhdxError(f"resized to {new} bytes, but the raw file still shows {seen}", path=raw,
                            errno=errno.EIO, reason=Reason.INTERNAL)
    if old == new:
        print(f"{target.shown}: already {format_size(new)}; nothing to do")
        return 0
    print(f"resized {target.shown}: {format_size(old)} -> {format_size(new)} (live, {target.holder.describe()})")
    return 0
