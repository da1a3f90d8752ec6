"""`vhdxfs compact IMAGE`: blocks that read entirely as zeros stop taking space; the file gets shorter.

Two passes, neither of which changes what the disk reads:

1. Each FULLY_PRESENT payload block is read; an all-zero one is discarded through the engine, which makes
   it ZERO (reads zeros, also in a differencing child, where NOT_PRESENT would show the parent) and punches
   its space out of the file, journaled like every BAT change.
2. Blocks at the file's tail move into the holes lower down (punched blocks, a BAT region left behind by
   a resize), and the file is truncated after the last structure that stays. A block's copy is durable
   before the BAT points at it (through the log), and the old copy is cut off only once the log is clean,
   so at any instant the BAT points at a complete copy.
"""

from __future__ import annotations

import argparse
import bisect
from dataclasses import dataclass
from pathlib import Path

import trio

from ..engine.disk import VirtualDisk
from ..engine.hostfile import HostFile
from ..engine.image import HostFactory, VhdxFile
from ..engine.metadata_update import LoggedUpdate
from ..format.bat import BitmapState, PayloadState, entry_state
from ..format.constants import HEADER_SECTION_SIZE, MiB
from ..sizes import format_size
from .progress import progress

COPY_CHUNK = 4 * MiB


@dataclass(frozen=True)
class CompactResult:
    zero_blocks: int  # all-zero blocks that became ZERO
    punched: int  # bytes of those blocks given back to the host
    moved: int  # bytes of blocks moved from the tail into holes
    truncated: int  # bytes the file got shorter by


async def discard_zero_blocks(path: str | Path, parent: str | None = None) -> tuple[int, int]:
    """Pass 1: (blocks, bytes) of all-zero payload blocks made ZERO and punched."""
    blocks_freed = 0
    async with await VirtualDisk.open(path, parent=parent) as disk:
        if disk.fixed:
            return 0, 0  # LeaveBlockAllocated: a fixed image keeps every block (spec 2.6.2.1)
        bs = disk.block_size
        with progress(disk.size, f"compacting {disk.path.name}") as bar:
            for block in range(disk.geometry.data_blocks):
                start = block * bs
                length = min(bs, disk.size - start)
                state, _offset = disk.bat.payload(block)
                if state == PayloadState.FULLY_PRESENT:
                    data = await disk.read(start, length)
                    if data.count(0) == length:
                        await disk.discard(start, length)
                        blocks_freed += 1
                bar.update(length)
    return blocks_freed, blocks_freed * bs


def _plan_moves(image: VhdxFile) -> tuple[list[tuple[int, int, int, int]], int]:
    """([(BAT index, old offset, new offset, length)], new file end): tail blocks into the lowest holes."""
    blocks = image.bat.allocated_ranges()
    fixed_spans = [(o, n, None) for o, n, _name in image.reserved_spans()]
    items = sorted(blocks + fixed_spans, key=lambda item: item[0])
    gaps: list[list[int]] = []  # [start, end) of free space between items
    at = HEADER_SECTION_SIZE
    for offset, length, _ in items:
        if offset > at:
            gaps.append([at, offset])
        at = max(at, offset + length)
    moves = []
    remaining = list(items)
    while remaining:
        offset, length, index = remaining[-1]
        if index is None:
            break  # a structure that cannot move: nothing after it is left
        # First fit: every lower gap is too small for this block, so a moved block never moves twice.
        gap = next((g for g in gaps if g[1] - g[0] >= length and g[0] + length <= offset), None)
        if gap is None:
            break
        moves.append((index, offset, gap[0], length))
        remaining.pop()
        bisect.insort(remaining, (gap[0], length, index), key=lambda item: item[0])
        gap[0] += length
    end = max((o + n for o, n, _ in remaining), default=HEADER_SECTION_SIZE)
    return moves, -(-end // MiB) * MiB


def move_tail_blocks(path: str | Path, host_factory: HostFactory = HostFile) -> tuple[int, int]:
    """Pass 2: (bytes moved, bytes truncated)."""
    image = VhdxFile.open(path, host_factory=host_factory)
    try:
        if image.metadata.leave_block_allocated:
            return 0, 0
        moves, new_end = _plan_moves(image)
        host, g, bat = image.host, image.geometry, image.bat
        old_size = host.size()
        moved = sum(n for *_rest, n in moves)
        with progress(moved, f"packing {image.path.name}") as bar:
            for index, old, new, length in moves:
                for pos in range(0, length, COPY_CHUNK):
                    n = min(COPY_CHUNK, length - pos)
                    host.pwrite(new + pos, host.pread(old + pos, n))
                    bar.update(n)
                state = entry_state(bat.entries[index])
                if g.is_bitmap_index(index):
                    bat.set_bitmap(index // (g.chunk_ratio + 1), BitmapState.PRESENT, new)
                else:
                    bat.set_payload(g.block_of_index(index), state, new)
        if moves:
            # Copies are durable before the BAT names them (LoggedUpdate syncs first); any subset of these
            # entries is consistent, as every old copy stays intact until the truncation below.
            with LoggedUpdate(image) as update:
                update.commit(bat.take_dirty_pages(), old_size)
        if new_end < old_size:
            host.truncate(new_end)
            host.fdatasync()
        return moved, max(0, old_size - max(new_end, host.size()))
    finally:
        image.close()


async def compact(path: str, parent: str | None = None) -> CompactResult:
    blocks, punched = await discard_zero_blocks(path, parent)
    moved, truncated = await trio.to_thread.run_sync(move_tail_blocks, path)
    return CompactResult(blocks, punched, moved, truncated)


def register(subparsers: argparse._SubParsersAction) -> None:
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
    result = trio.run(compact, args.image, args.parent)
    print(f"compacted {args.image}: {format_size(result.punched)} given back "
          f"({result.zero_blocks} all-zero blocks), {format_size(result.moved)} moved, "
          f"file {format_size(result.truncated)} shorter")
    return 0
