"""`vhdxfs resize IMAGE SIZE [--shrink]`: change the virtual size, keeping the data.

How a resize stays crash safe (new BAT entries first, then one log entry that switches the region table
and the disk size together) is the engine's business: engine/resizing.py.
"""

from __future__ import annotations

import argparse

from ..engine import resize
from ..errors import UsageError
from ..sizes import format_size, parse_size


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "resize", help="change the virtual size of an image",
        description="Grow (or with --shrink, shrink) the virtual disk of IMAGE to SIZE (binary suffixes: 512M, "
                    "10G), keeping its data. SIZE must be a multiple of the logical sector size. Every change "
                    "goes through the image's log, so a crash leaves either the old or the new size. Shrinking "
                    "is refused when a block past the new end holds data. Differencing images cannot be "
                    "resized (a child has its parent's size), and children of IMAGE stop matching it, as "
                    "its DataWriteGuid changes. The image must not be in use.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("size", metavar="SIZE", help="the new virtual size")
    p.add_argument("--shrink", action="store_true", help="allow a size smaller than the current one")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        new_size = parse_size(args.size, "SIZE")
    except UsageError as exc:
        raise exc.with_path(args.image) from None
    result = resize(args.image, new_size, shrink=args.shrink)
    if result.old_size == result.new_size:
        print(f"{args.image}: already {format_size(result.new_size)}; nothing to do")
        return 0
    moved = f"; BAT moved to offset {result.bat_moved_to}" if result.bat_moved_to is not None else ""
    print(f"resized {args.image}: {format_size(result.old_size)} -> {format_size(result.new_size)}{moved}")
    return 0
