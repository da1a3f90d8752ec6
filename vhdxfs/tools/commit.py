"""`vhdxfs commit CHILD`: merge a differencing child into its parent.

What the child holds goes into the parent: FULLY_PRESENT blocks whole, PARTIALLY_PRESENT blocks sector by
sector as the sector bitmap says, and ZERO / UNMAPPED / UNDEFINED blocks (which read as zeros in the child)
as zeros. NOT_PRESENT blocks show the parent already and are left alone. Afterwards the parent reads
exactly as the child did.

Spec note <12> ordering: merging changes the parent, so its DataWriteGuid must change, and a child that
still names only the old GUID would then refuse its parent. So before the parent's first change, the child's
parent locator is rewritten through the child's log with parent_linkage = the parent's current GUID and
parent_linkage2 = the GUID the parent is about to get. At every instant of the merge the child matches its
parent and reads the same, since the parent only ever takes on the child's own contents. The child stays
valid afterwards but is no longer needed.
"""

from __future__ import annotations

import argparse
import functools
import uuid
from dataclasses import dataclass
from pathlib import Path

import trio

from ..engine.bitmap import SectorBitmaps, bit_runs
from ..engine.disk import VirtualDisk
from ..engine.hostfile import HostFile
from ..engine.image import HostFactory, VhdxFile
from ..engine.metadata_update import LoggedUpdate, PageEdits, check_fits, replace_item
from ..engine.parent import check_parent, find_parent
from ..errors import ParentError, UsageError, VhdxError
from ..format import guids
from ..format.bat import PayloadState
from ..format.constants import SECTOR_BITMAP_BLOCK_SIZE
from ..format.metadata import ParentLocator
from ..sizes import format_size
from .progress import progress

CHUNK = 4 << 20
_READS_ZERO = (PayloadState.ZERO, PayloadState.UNMAPPED, PayloadState.UNDEFINED)


@dataclass(frozen=True)
class CommitResult:
    parent: Path
    copied: int  # bytes of child data written into the parent
    zeroed: int  # bytes the child holds as zeros, zeroed in the parent
    parent_data_write_guid: uuid.UUID


class MergeTarget(VirtualDisk):
    """The parent, opened writable for the merge.

    Its first change sets the DataWriteGuid already stored in the child's parent_linkage2 (note <12>),
    not a random new one as an ordinary write would (2.2.2.1).
    """

    merge_guid: uuid.UUID | None = None
    changed = False

    async def _before_guest_write(self) -> None:
        if self.merge_guid is None:
            raise VhdxError("internal: the merge GUID is not in the child yet", path=self.path)
        self.changed = True
        if self.image.header.data_write_guid != self.merge_guid:
            await trio.to_thread.run_sync(functools.partial(self.image.update_header,
                                                            data_write_guid=self.merge_guid))

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        # Workaround: VirtualDisk.write into a block that was PARTIALLY_PRESENT when the image was opened
        # marks sectors in a sector bitmap it never loaded (KeyError) unless a read loaded it first. A
        # parent that is itself a differencing image meets this on every sector-aligned merge write.
        if self.bitmaps is not None and len(data):
            per_chunk = self.geometry.chunk_size
            for chunk in range(offset // per_chunk, (offset + len(data) - 1) // per_chunk + 1):
                if chunk not in self.bitmaps.blocks:
                    await trio.to_thread.run_sync(self.bitmaps.load, chunk, *self.bat.bitmap(chunk))
        await super().write(offset, data)


def store_linkage(child: VhdxFile, current: uuid.UUID, upcoming: uuid.UUID) -> None:
    """Rewrite the child's parent locator (one log entry) to accept the parent before and after the merge."""
    locator = child.metadata.parent_locator
    entries = dict(locator.entries)
    entries["parent_linkage"] = guids.braced(current)
    entries["parent_linkage2"] = guids.braced(upcoming)
    edits = PageEdits(child.read_meta)
    replace_item(child, edits, guids.PARENT_LOCATOR, ParentLocator(entries, locator.locator_type).encode())
    pages = edits.changed()
    update = LoggedUpdate(child)
    check_fits(child, len(pages), update.max_pages)
    with update:
        update.commit_atomic(pages, child.host.size())


def child_runs(child: VhdxFile, bitmaps: SectorBitmaps, block: int) -> tuple[int, list[tuple[int, int]]]:
    """(state, [(virtual offset, length)]) of what the child itself holds in ``block``."""
    g = child.geometry
    start = block * g.block_size
    length = min(g.block_size, g.virtual_size - start)
    state, _offset = child.bat.payload(block)
    if state == PayloadState.PARTIALLY_PRESENT:
        lss = g.logical_sector_size
        chunk, bit = bitmaps.sector_position(start // lss)
        bits = bitmaps.load(chunk, *child.bat.bitmap(chunk))
        return state, [(start + (first - bit) * lss, count * lss)
                       for first, count, present in bit_runs(bits, bit, length // lss) if present]
    if state == PayloadState.NOT_PRESENT:
        return state, []
    return state, [(start, length)]


async def _merge(child: VhdxFile, target: MergeTarget) -> tuple[int, int]:
    g = child.geometry
    bitmaps = SectorBitmaps(g, lambda off: child.read_meta(off, SECTOR_BITMAP_BLOCK_SIZE))
    copied = zeroed = 0
    with progress(g.virtual_size, f"committing {child.path.name}") as bar:
        for block in range(g.data_blocks):
            state, runs = await trio.to_thread.run_sync(child_runs, child, bitmaps, block)
            file_offset = child.bat.payload(block)[1]
            for voff, n in runs:
                if state in _READS_ZERO:
                    await target.discard(voff, n)
                    zeroed += n
                    continue
                for pos in range(voff, voff + n, CHUNK):
                    m = min(CHUNK, voff + n - pos)
                    await target.write(pos, await child.host.apread(file_offset + pos - block * g.block_size, m))
                    copied += m
            bar.update(min(g.block_size, g.virtual_size - block * g.block_size))
    return copied, zeroed


async def commit(child_path: str | Path, parent: str | Path | None = None,
                 host_factory: HostFactory = HostFile) -> CommitResult:
    # Writable: the child is locked against other users for the whole merge.
    child = await trio.to_thread.run_sync(functools.partial(VhdxFile.open, child_path, host_factory=host_factory))
    try:
        if not child.is_differencing:
            raise UsageError("is not a differencing image; there is no parent to commit into", path=child_path,
                             field="FileParameters.HasParent")
        parent_path = await trio.to_thread.run_sync(find_parent, child.path, child.metadata, parent)
        target = await MergeTarget.open(parent_path, host_factory=host_factory)
        try:
            before = target.image.header.data_write_guid
            check_parent(child.path, child.metadata, parent_path, target.image.metadata, before)
            upcoming = guids.new_guid()
            await trio.to_thread.run_sync(store_linkage, child, before, upcoming)
            target.merge_guid = upcoming
            copied, zeroed = await _merge(child, target)
        finally:
            await target.close()
        after = target.image.header.data_write_guid
        if target.changed and after != upcoming:
            raise ParentError(f"parent {parent_path} took DataWriteGuid {{{after}}}, not the {{{upcoming}}} stored "
                              "in the child's parent_linkage2", path=child_path, field="ParentLocator")
        return CommitResult(Path(parent_path), copied, zeroed, after)
    finally:
        child.close()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "commit", help="merge a differencing child into its parent",
        description="Write everything the differencing image CHILD holds into its parent, so the parent reads "
                    "exactly as CHILD did. Blocks CHILD holds as zeros become zeros in the parent; blocks it "
                    "does not hold keep the parent's data. The parent gets a new DataWriteGuid, which is first "
                    "stored in CHILD's parent locator as parent_linkage2 (MS-VHDX note 12), so CHILD stays a "
                    "valid child of the changed parent at every moment, also after a crash; afterwards its "
                    "parent_linkage2 is the parent's new DataWriteGuid. CHILD is then no longer needed (it reads "
                    "the same as its parent) and may be deleted; other children of the parent no longer match "
                    "it. Neither image may be in use.")
    p.add_argument("child", metavar="CHILD")
    p.add_argument("--parent", metavar="PATH", help="the parent of CHILD, if it cannot be found")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = trio.run(commit, args.child, args.parent)
    print(f"committed {args.child} into {result.parent}: {format_size(result.copied)} of data, "
          f"{format_size(result.zeroed)} of zeros")
    return 0
