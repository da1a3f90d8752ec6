"""`vhdxfs compact IMAGE`: blocks that read entirely as zeros stop taking space.

Each allocated payload block is read; an all-zero one is discarded through the engine, which makes it
ZERO (reads zeros, also in a differencing child, where NOT_PRESENT would show the parent) and punches
its space out of the file, journaled like every BAT change. The image's contents do not change.
"""

from __future__ import annotations

import argparse

import trio

from ..engine.disk import VirtualDisk
from ..format.bat import PayloadState
from ..sizes import format_size
from .progress import progress


async def compact(path: str, parent: str | None = None) -> int:
    """Return the bytes of payload blocks given back to the host."""
    freed = 0
    async with await VirtualDisk.open(path, parent=parent) as disk:
        if disk.fixed:
            return 0  # LeaveBlockAllocated: a fixed image keeps every block (spec 2.6.2.1)
        bs, blocks = disk.block_size, disk.geometry.data_blocks
        with progress(blocks, f"compacting {disk.path.name}") as bar:
            for block in range(blocks):
                bar.update(1)
                state, _offset = disk.bat.payload(block)
                if state != PayloadState.FULLY_PRESENT:
                    continue
                start = block * bs
                length = min(bs, disk.size - start)
                data = await disk.read(start, length)
                if data.count(0) == length:
                    await disk.discard(start, length)
                    freed += bs
    return freed


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compact", help="give the space of all-zero blocks back to the host",
                              description="Make payload blocks that read entirely as zeros take no space: they "
                                          "become ZERO blocks and their space is punched out of the image file. "
                                          "The contents of the disk do not change. The image must not be in use.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--parent", metavar="PATH", help="the parent of a differencing IMAGE, if it cannot be found")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    freed = trio.run(compact, args.image, args.parent)
    print(f"compacted {args.image}: {format_size(freed)} given back")
    return 0
