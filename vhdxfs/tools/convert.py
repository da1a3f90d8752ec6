"""`vhdxfs convert SRC DST`: raw <-> VHDX (and VHDX -> VHDX, raw -> raw), chosen by the file extensions.

The copy is the engine's (engine/ops/convert.py: a reader thread, zero pieces of -S bytes skipped, the
output flushed before it returns, removed on failure). This module parses the arguments and prints the
result.
"""

from __future__ import annotations

import argparse
import sys

from ..engine import Progress, convert, no_progress
from ..sizes import format_size, parse_size


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("convert", help="convert raw <-> VHDX",
                              description="Convert between raw and VHDX, by extension (.vhdx/.avhdx are VHDX, "
                                          "anything else is raw); a differencing SRC is converted as its whole "
                                          "chain reads. The output is sparse: holes, unallocated blocks and "
                                          "pieces of -S bytes that hold only zeros are not written. DST must "
                                          "not exist; it is flushed to disk before the command returns, and "
                                          "removed if the conversion fails. Either may be an object in an S3 "
                                          "store, s3://BUCKET/KEY: a download is as sparse as any output; an "
                                          "upload is built in a temporary file (in TMPDIR) and sent by multipart "
                                          "upload.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--type", choices=("dynamic", "fixed"), default="dynamic", help="type of a VHDX output")
    p.add_argument("--block-size", help="block size of a VHDX output (default by size, as QEMU)")
    p.add_argument("--parent", metavar="PATH", help="the parent of a differencing SRC, if it cannot be found")
    p.add_argument("-S", "--sparse-size", metavar="SIZE", default="4K",
                   help="skip pieces of SIZE bytes (aligned) that hold only zeros; a multiple of 512 up to 16M, "
                        "default 4K as qemu-img's -S; 0 writes all the data SRC holds, zeros too")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    block_size = parse_size(args.block_size, "--block-size") if args.block_size else None
    sparse = parse_size(args.sparse_size, "--sparse-size")
    bar: Progress = no_progress
    if sys.stderr.isatty():  # the bar shows on a terminal only: elsewhere tqdm's import (20 ms) is saved
        from .progress import progress as bar
    result = convert(args.src, args.dst, disk_type=args.type, block_size=block_size, parent=args.parent,
                     sparse=sparse, progress=bar)
    print(f"converted {args.src} -> {args.dst} ({format_size(result.written)} of data)")
    return 0
