"""Commit: merge a differencing child into its parent.

What the child holds goes into the parent: FULLY_PRESENT blocks whole, PARTIALLY_PRESENT blocks sector by
sector as the sector bitmap says, and ZERO / UNMAPPED / UNDEFINED blocks (which read as zeros in the child)
as zeros. NOT_PRESENT blocks show the parent already and are left alone. Afterwards the parent reads
exactly as the child did. The child's own translation (translate.py, without its parent) says which is
which: DATA runs are copied, ZERO runs zeroed, PARENT runs skipped.

Spec note <12> ordering: merging changes the parent, so its DataWriteGuid must change, and a child that
still names only the old GUID would then refuse its parent. So before the parent's first change, the child's
parent locator is rewritten through the child's log with parent_linkage = the parent's current GUID and
parent_linkage2 = the GUID the parent is about to get; the parent is opened with that GUID as the one its
first write sets (``data_write_guid``). At every instant of the merge the child matches its parent and
reads the same, since the parent only ever takes on the child's own contents. The child stays valid
afterwards but is no longer needed.

The child is read through its own VhdxFile, not a Disk: a Disk of the child would open the parent too,
read-only, and its shared lock would keep out the writable open of the parent that the merge needs.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ...errors import ParentError, Reason, UsageError
from ...format import guids
from ...format.metadata import ParentLocator
from ..disk.chain import open_chain
from ..disk.runs import Kind
from ..disk.steps import SyncIO, run_sync
from ..disk.sync import Disk
from ..disk.translate import Translator, new_bitmaps
from ..image.host import HostFactory
from ..image.loader import VhdxFile
from ..image.locations import local
from ..image.logged_update import LoggedUpdate, PageEdits, check_fits, replace_item
from ..image.parents import check_parent, find_parent
from ..image.posix import PosixFile
from .mover import CHUNK, move
from .progress import Progress, no_progress
from .sources import Piece, split


@dataclass(frozen=True)
class CommitResult:
    parent: Path
    copied: int  # bytes of child data written into the parent
    zeroed: int  # bytes the child holds as zeros, zeroed in the parent
    parent_data_write_guid: uuid.UUID


def locator_pages(child: VhdxFile, entries: dict[str, str]) -> dict[int, bytes]:
    """The metadata pages that make the child's parent locator hold ``entries``; the child's in-memory
    metadata takes them on (the caller writes the pages through the child's log)."""
    locator = child.metadata.parent_locator
    assert locator is not None, "a differencing image has a parent locator (Metadata.validate)"
    new = ParentLocator(entries, locator.locator_type)
    edits = PageEdits(child.read_meta)
    replace_item(child, edits, guids.PARENT_LOCATOR, new.encode())
    child.metadata = dataclasses.replace(child.metadata, parent_locator=new)
    return edits.changed()


def write_logged(image: VhdxFile, pages: dict[int, bytes]) -> None:
    """Write ``pages`` of an image opened writable, with a clean log, through its log as one entry."""
    update = LoggedUpdate(image)
    check_fits(image, len(pages), update.max_pages)
    with update:
        update.commit_atomic(pages, image.host.size())


def store_linkage(child: VhdxFile, current: uuid.UUID, upcoming: uuid.UUID) -> None:
    """Rewrite the child's parent locator (one log entry) to accept the parent before and after the merge."""
    locator = child.metadata.parent_locator
    assert locator is not None, "a differencing image has a parent locator (Metadata.validate)"
    entries = dict(locator.entries)
    entries["parent_linkage"] = guids.braced(current)
    entries["parent_linkage2"] = guids.braced(upcoming)
    write_logged(child, locator_pages(child, entries))


def _pieces(child: VhdxFile) -> Iterator[Piece]:
    """What the child holds, in order: its DATA runs as pieces read from its file, its ZERO runs as ZERO
    pieces; one sector bitmap chunk of the disk translated at a time (run by the mover's reader thread)."""
    g = child.geometry
    bitmaps = new_bitmaps(g, child.read_meta)
    translator = Translator(child.bat, bitmaps, has_parent=True)
    io = SyncIO(child.host)
    for start in range(0, g.virtual_size, g.chunk_size):
        length = min(g.chunk_size, g.virtual_size - start)
        for voff, n, kind, file_offset, _depth in run_sync(translator.translate_loading(io, start, length)):
            if kind == Kind.ZERO:
                yield Piece(voff, n, Kind.ZERO)
            elif kind == Kind.DATA:
                yield from split(voff, n, CHUNK, child.host.pread_into, file_offset)
        bitmaps.blocks.clear()  # each chunk's bitmap is read once: keep memory flat


def _merge(child: VhdxFile, target: Disk, progress: Progress) -> tuple[int, int]:
    """Copy what the child holds into ``target``: data written as it is (no zero detection: the parent's
    blocks take the child's bytes), zeros discarded; reads overlapped with the writes (mover.py)."""
    size = child.geometry.virtual_size
    with progress(size, f"committing {child.path.name}") as bar:
        moved = move(_pieces(child), target.write, total=size, bar=bar, zero=target.discard)
    return moved.written, moved.zeroed


def commit(child_path: str | os.PathLike[str], parent: str | os.PathLike[str] | None = None, *,
           host_factory: HostFactory = PosixFile, progress: Progress = no_progress) -> CommitResult:
    """Merge the differencing image ``child_path`` into its parent (``parent`` overrides the locator)."""
    # Writable: the child is locked against other users for the whole merge.
    child = VhdxFile.open(child_path, host_factory=host_factory)
    try:
        if not child.is_differencing:
            raise UsageError("is not a differencing image; there is no parent to commit into", path=child_path,
                             field="FileParameters.HasParent")
        parent_path = local(find_parent(child.path, child.metadata, parent), "commit writes into the parent")
        upcoming = guids.new_guid()
        # A frozen parent may be written here: the merge keeps its child valid (parent_linkage2).
        core = open_chain(parent_path, host_factory=host_factory, data_write_guid=upcoming, allow_frozen=True)
        target = Disk(core)
        try:
            before = core.image.header.data_write_guid
            check_parent(child.path, child.metadata, parent_path, core.image.metadata, before)
            store_linkage(child, before, upcoming)
            copied, zeroed = _merge(child, target, progress)
        finally:
            target.close()
        after = core.image.header.data_write_guid
        if after != before and after != upcoming:
            raise ParentError(f"parent {parent_path} took DataWriteGuid {{{after}}}, not the {{{upcoming}}} stored "
                              "in the child's parent_linkage2", path=child_path, field="ParentLocator",
                              reason=Reason.PARENT_MISMATCH)
        return CommitResult(Path(parent_path), copied, zeroed, after)
    finally:
        child.close()
