"""Compact: blocks that read entirely as zeros stop taking space, and the file gets shorter.

Two passes, neither of which changes what the disk reads:

1. Each payload block the image holds whole (a DATA extent of the image itself covering the block: a
   FULLY_PRESENT block) is read; an all-zero one is discarded through the engine, which makes it ZERO
   (reads zeros, also in a differencing child, where NOT_PRESENT would show the parent) and punches its
   space out of the file, journaled like every BAT change. The scan reads the block straight from the
   file (the extent says where) into one reused buffer, skips the file's holes, compares against zeros
   with memcmp (zeroscan.py) and stops at the first byte that is not zero: a block of data costs one
   64 KiB read, an all-zero block one memcmp over what the file holds of it.
2. Blocks at the file's tail move into the holes lower down (punched blocks, a BAT region left behind by
   a resize), and the file is truncated after the last structure that stays (SpaceMap.plan_moves). A
   block's copy is durable before the BAT points at it (through the log), and the old copy is cut off
   only once the log is clean, so at any instant the BAT points at a complete copy. A copy keeps the
   holes of the block it copies (the new place is punched first), so moving never allocates more.

Fixed images are left alone: LeaveBlockAllocated (2.6.2.1) says every block keeps its space.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ...format.bat import BitmapState, entry_state
from ...format.constants import MiB
from ..disk.chain import open_chain
from ..disk.runs import Kind
from ..disk.sync import Disk
from ..image.host import HostFactory, HostIO
from ..image.loader import VhdxFile
from ..image.logged_update import LoggedUpdate
from ..image.posix import PosixFile
from .hostfile import data_ranges, fd_of, start_writeback
from .progress import Progress, no_progress
from .zeroscan import is_zero

COPY_CHUNK = 1 * MiB
SCAN_PIECE = 1 * MiB  # the zero scan reads a block in pieces of this size (they stay in the CPU cache)...
FIRST_PIECE = 64 * 1024  # ...after a first small one


@dataclass(frozen=True)
class CompactResult:
    zero_blocks: int  # all-zero blocks that became ZERO
    punched: int  # bytes of those blocks given back to the host
    moved: int  # bytes of blocks moved from the tail into holes
    truncated: int  # bytes the file got shorter by


def reads_as_zeros(host: HostIO, offset: int, length: int, buf: bytearray) -> bool:
    """Do the file's bytes [offset, offset+length) hold only zeros? Holes of the file are not read, and
    the first piece read is small: a block of data is told apart by its first bytes, nearly always."""
    view = memoryview(buf)
    for at, n in data_ranges(host, offset, length):
        end, piece = at + n, FIRST_PIECE
        while at < end:
            m = min(piece, end - at, len(buf))
            host.pread_into(at, view[:m])
            if not is_zero(view[:m]):
                return False
            at += m
            piece = len(buf)
    return True


def discard_zero_blocks(path: str | os.PathLike[str], parent: str | os.PathLike[str] | None = None, *,
                        host_factory: HostFactory = PosixFile, progress: Progress = no_progress) -> tuple[int, int]:
    """Pass 1: (blocks, bytes) of all-zero payload blocks made ZERO and punched."""
    freed = 0
    core = open_chain(path, parent=parent, host_factory=host_factory)
    with Disk(core) as disk:
        if disk.fixed:
            return 0, 0
        bs, size, host = disk.block_size, disk.size, core.image.host
        buf = bytearray(SCAN_PIECE)
        with progress(size, f"compacting {disk.path.name}") as bar:
            for extent in disk.extents():
                if extent.kind == Kind.DATA and extent.depth == 0:
                    end = extent.offset + extent.length
                    # The blocks this extent covers whole; a FULLY_PRESENT block always lies in one extent,
                    # and an extent is contiguous in the file (the writable open applied any dirty log).
                    for start in range(-(-extent.offset // bs) * bs, end, bs):
                        length = min(bs, size - start)
                        if start + length > end:
                            break
                        if reads_as_zeros(host, extent.file_offset + start - extent.offset, length, buf):
                            disk.discard(start, length)
                            freed += 1
                bar.update(extent.length)
    return freed, freed * bs


def copy_range(host: HostIO, old: int, new: int, length: int, buf: bytearray) -> None:
    """Copy [old, old+length) of the file to ``new`` (free space: no BAT entry names it yet). Where the
    host can punch, the new place is punched first and only what the old one holds as data is copied, so
    a block QEMU left sparse stays sparse; the writes start going to the disk as they are made."""
    ranges: list[tuple[int, int]] = [(old, length)]
    if fd_of(host) is not None and host.punch_hole(new, length):
        ranges = list(data_ranges(host, old, length))
    view = memoryview(buf)
    for at, n in ranges:
        for pos in range(at, at + n, len(buf)):
            m = min(len(buf), at + n - pos)
            host.pread_into(pos, view[:m])
            host.pwrite(new + pos - old, view[:m])
    start_writeback(fd_of(host), new, length)


def move_tail_blocks(path: str | os.PathLike[str], host_factory: HostFactory = PosixFile, *,
                     progress: Progress = no_progress) -> tuple[int, int]:
    """Pass 2: (bytes moved, bytes truncated)."""
    image = VhdxFile.open(path, host_factory=host_factory)
    try:
        if image.metadata.leave_block_allocated:
            return 0, 0
        moves, new_end = image.space_map().plan_moves()
        host, g, bat = image.host, image.geometry, image.bat
        old_size = host.size()
        moved = sum(n for *_rest, n in moves)
        buf = bytearray(COPY_CHUNK)
        with progress(moved, f"packing {image.path.name}") as bar:
            for index, old, new, length in moves:
                copy_range(host, old, new, length, buf)
                bar.update(length)
                if g.is_bitmap_index(index):
                    bat.set_bitmap(index // (g.chunk_ratio + 1), BitmapState.PRESENT, new)
                else:
                    bat.set_payload(g.block_of_index(index), entry_state(bat.entry(index)), new)
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


def compact(path: str | os.PathLike[str], parent: str | os.PathLike[str] | None = None, *,
            host_factory: HostFactory = PosixFile, progress: Progress = no_progress) -> CompactResult:
    """Both passes, one after the other (the image must not be in use)."""
    blocks, punched = discard_zero_blocks(path, parent, host_factory=host_factory, progress=progress)
    moved, truncated = move_tail_blocks(path, host_factory, progress=progress)
    return CompactResult(blocks, punched, moved, truncated)
