"""Resize: change the virtual size of a dynamic or fixed image, keeping its data.

A new size changes the Virtual Disk Size metadata item and the number of BAT entries (docs/design.md: for
a dynamic or fixed image, data_blocks + floor((data_blocks - 1) / chunk_ratio)). A payload block keeps its
BAT index (payload_index depends only on chunk_ratio, which a resize does not change), so growing only
appends entries. When the BAT region cannot hold them, the BAT moves to a new 1 MiB aligned region at
the end of the file: payload blocks never move, and the old region's space is punched out afterwards.

Crash safety, in order: the new entries (in the old region past the current table, or in the new region)
are written through the log while nothing reads them yet; then one log entry switches the region table
copies and the disk size together. A crash before that entry leaves the old image, after it the new one.
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from dataclasses import dataclass, replace
from pathlib import Path

from ...errors import Reason, UnsupportedError, UsageError, VhdxError
from ...format import guids
from ...format.bat import Geometry, PayloadState, make_entry
from ...format.constants import MAX_VIRTUAL_SIZE, REGION_TABLE_OFFSETS, MiB
from ...format.region import RegionTable
from ...sizes import format_size
from ..image.chainrecord import check_not_frozen
from ..image.host import HostFactory
from ..image.loader import VhdxFile
from ..image.logged_update import LoggedUpdate, PageEdits, changed_pages, check_fits, replace_item
from ..image.posix import PosixFile

_HOLDS_DATA = (PayloadState.FULLY_PRESENT, PayloadState.PARTIALLY_PRESENT)
_COMPARE_STEP = 4 * MiB


@dataclass(frozen=True)
class ResizeResult:
    """What a resize did: sizes before and after, and where the BAT went if it had to move."""

    old_size: int
    new_size: int
    bat_moved_to: int | None  # file offset of the relocated BAT region, if it moved


def _align(n: int) -> int:
    return -(-n // MiB) * MiB


def resize(path: str | os.PathLike[str], new_size: int, *, shrink: bool = False,
           host_factory: HostFactory = PosixFile) -> ResizeResult:
    """Give ``path`` the virtual size ``new_size`` (bytes); below the current size only with ``shrink``.

    A refused resize (differencing image, bad size, data past a new end) writes nothing.
    """
    # Refusals come from a read-only look, so a refused resize leaves every byte of the file as it was.
    check_not_frozen(path, Path(path))  # a base with checkpoints over it keeps its size
    image = VhdxFile.open(path, read_only=True, host_factory=host_factory)
    try:
        _check_request(image, new_size, shrink)
        if new_size < image.metadata.virtual_size:
            _check_shrink(image, new_size)
    except VhdxError as exc:
        raise exc.with_path(path) from None
    finally:
        image.close()
    image = VhdxFile.open(path, host_factory=host_factory)
    try:
        return resize_image(image, new_size, shrink)
    except VhdxError as exc:
        raise exc.with_path(path) from None
    finally:
        image.close()


def _check_request(image: VhdxFile, new_size: int, shrink: bool) -> None:
    meta = image.metadata
    if image.is_differencing:
        raise UnsupportedError("a differencing image must keep its parent's size (the parent's sectors show "
                               "through it); resize the base image and create a new child, or commit the child "
                               "into its parent first", field="VirtualDiskSize")
    lss = meta.logical_sector_size
    if new_size <= 0 or new_size > MAX_VIRTUAL_SIZE or new_size % lss:
        raise UsageError(f"size {new_size} must be a multiple of the logical sector size ({lss}) from {lss} bytes "
                         "to 64 TiB", field="SIZE")
    if new_size < meta.virtual_size and not shrink:
        raise UsageError(f"{format_size(new_size)} is smaller than the current {format_size(meta.virtual_size)}; "
                         "give --shrink to shrink", field="SIZE")


def _check_shrink(image: VhdxFile, new_size: int) -> None:
    """Refuse when data lies past the new end: a block wholly past it that holds data, or the tail (past the
    new end) of the block that straddles it when that tail is not all zeros."""
    g = image.geometry
    bs = g.block_size
    for block in range(new_size // bs, g.data_blocks):
        state, file_offset = image.bat.payload(block)
        if state not in _HOLDS_DATA:
            continue
        start = block * bs
        if start >= new_size and image.metadata.leave_block_allocated:
            raise UnsupportedError(f"a fixed image keeps every block allocated (here from virtual offset {start} "
                                   "on), so it cannot shrink; convert it to a dynamic image first",
                                   field="FileParameters.LeaveBlockAllocated")
        if start >= new_size:
            raise UsageError(f"the block at virtual offset {start} lies past the new end ({new_size}) and holds "
                             "data; shrinking would lose it (discard it first, or run `vhdxfs compact` if it "
                             "reads as zeros)", field="SIZE", reason=Reason.DATA_IN_THE_WAY)
        tail = image.host.pread(file_offset + new_size - start, min(bs, g.virtual_size - start) - (new_size - start))
        if tail.count(0) != len(tail):
            first = new_size + next(i for i, b in enumerate(tail) if b)
            raise UsageError(f"virtual offset {first} lies past the new end ({new_size}) and holds data; "
                             "shrinking would lose it", field="SIZE", reason=Reason.DATA_IN_THE_WAY)


def _bat_pages(image: VhdxFile, entries: array[int], offset: int, length: int) -> dict[int, bytes]:
    """The pages of the BAT region at ``offset`` that must change to hold ``entries`` (zeros after them).

    Compared a few MiB at a time: a 64 TiB image with 1 MiB blocks has a 512 MiB BAT.
    """
    if sys.byteorder != "little":
        entries = array("Q", entries)
        entries.byteswap()
    raw = memoryview(entries).cast("B")
    pages: dict[int, bytes] = {}
    for start in range(0, length, _COMPARE_STEP):
        n = min(_COMPARE_STEP, length - start)
        wanted = bytes(raw[start:start + n])
        wanted += bytes(n - len(wanted))
        pages.update(changed_pages(offset + start, image.read_meta(offset + start, n), wanted))
    return pages


def resize_image(image: VhdxFile, new_size: int, shrink: bool = False) -> ResizeResult:
    """Resize an image opened writable with a clean log (a live resize passes the running disk's own open);
    refusals write nothing. The caller loads the structures afresh afterwards (``VhdxFile.load``)."""
    _check_request(image, new_size, shrink)
    old = image.geometry
    if new_size == old.virtual_size:
        return ResizeResult(new_size, new_size, None)
    if new_size < old.virtual_size:
        _check_shrink(image, new_size)
    new = Geometry(new_size, old.block_size, old.logical_sector_size, old.has_parent)
    host, bs = image.host, old.block_size
    fixed = image.metadata.leave_block_allocated

    # Space past the data of the old last block becomes visible when growing: make sure it reads as zeros.
    tail = old.virtual_size % bs
    last = old.data_blocks - 1
    if new_size > old.virtual_size and tail and image.bat.payload(last)[0] == PayloadState.FULLY_PRESENT:
        host.write_zeros(image.bat.payload(last)[1] + tail, bs - tail)

    entries = image.bat.to_array(new.total_entries)
    entries.frombytes(bytes(8 * (new.total_entries - len(entries))))
    bat_region = image.regions.region(guids.BAT_REGION)
    end = _align(max(host.size(), image.space_map().end()))
    moved = bat_region.length < new.bat_bytes
    if moved:
        bat_offset, bat_length = end, new.bat_region_length
        end += bat_length
    else:
        bat_offset, bat_length = bat_region.file_offset, bat_region.length
    new_blocks = range(old.data_blocks, new.data_blocks) if fixed else range(0)
    for i, block in enumerate(new_blocks):
        entries[new.payload_index(block)] = make_entry(PayloadState.FULLY_PRESENT, end + i * bs)
    file_size = max(host.size(), end + len(new_blocks) * bs)

    if host.size() < file_size:
        host.truncate(file_size)
    if moved:
        host.allocate(bat_offset, bat_length)
    if new_blocks:
        host.allocate(end, len(new_blocks) * bs)

    bat_pages = _bat_pages(image, entries, bat_offset, bat_length)

    switch = PageEdits(image.read_meta)
    replace_item(image, switch, guids.VIRTUAL_DISK_SIZE, struct.pack("<Q", new_size))
    if moved:
        table = RegionTable(tuple(replace(e, file_offset=bat_offset, length=bat_length) if e.guid == guids.BAT_REGION
                                  else e for e in image.regions.entries)).encode()
        for offset in REGION_TABLE_OFFSETS:
            switch.patch(offset, table)
    switch_pages = switch.changed()

    # 2.2.2.1: the disk's shape changes, so a new DataWriteGuid (children of the old shape stop matching).
    update = LoggedUpdate(image, new_data_write_guid=True)
    check_fits(image, len(switch_pages), update.max_pages)
    with update:
        update.commit(bat_pages, file_size)  # entries nothing reads before the switch
        update.commit_atomic(switch_pages, file_size)
    if moved:
        host.punch_hole(bat_region.file_offset, bat_region.length)
    return ResizeResult(old.virtual_size, new_size, bat_offset if moved else None)
