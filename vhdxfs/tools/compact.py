"""`vhdxfs compact IMAGE`: blocks that read entirely as zeros stop taking space; the file gets shorter.

The two passes (all-zero blocks made ZERO and punched; tail blocks moved into the holes, the file
truncated) are the engine's: engine/compaction.py. This module parses the arguments and prints the result.
"""

from __future__ import annotations

import argparse

from ..engine import compact
from ..sizes import format_size
from .progress import progress


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("compact", help="give the space of all-zero blocks back to the host",
                              description="Make payload blocks that read entirely as zeros take no space: they "
                                          "become ZERO blocks and their space is punched out of the image file. "
                                          "Then blocks at the end of the file move into the holes and the file "
                                          "is truncated. The contents of the disk do not change, and a crash at "
                                          "any moment leaves a consistent image. Fixed images are left as they "
                                          "are. The image must not be in use.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--parent", metavar="PATH", help="the parent of a differencing IMAGE, if it cannot be found")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = compact(args.image, args.parent, progress=progress)
    print(f"compacted {args.image}: {format_size(result.punched)} given back "
          f"({result.zero_blocks} all-zero blocks), {format_size(result.moved)} moved, "
          f"file {format_size(result.truncated)} shorter")
    return 0
