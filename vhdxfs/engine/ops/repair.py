"""Repair: bring a damaged image back to a consistent state, and say what changed.

An ordinary open refuses a damaged image outright, as it must. Repair opens it leniently instead
(``VhdxFile.open(lenient=True)``, image.py): the one loader walks the same structures in the same order
but keeps going where it can, and lists what it got past (``observations``, ``bad_entries``). A lenient
open writes nothing, so repair writes only when something needs fixing: a clean image is left byte for
byte as it was.

What is repaired, in this order (each step needs the ones before it):
1. a damaged header (bad signature or checksum, or, when the other one is sound, a log misaligned or
   outside the file), or two headers that disagree at the same sequence number: both are rewritten from
   the good one (2.2.2.1, which also gives the file a new FileWriteGuid);
2. a dirty log: its active sequence is replayed into the file and LogGuid cleared, as a writable open does;
3. a damaged region table copy, or copies that differ: rewritten from the copy an open uses (the first
   valid one), through the log;
4. BAT entries with an invalid state or reserved bits set, or whose block lies outside the file, overlaps
   the header section, log or a region, or overlaps another block. Such a payload block becomes ZERO: it
   reads as zeros in every kind of image. NOT_PRESENT was the other choice, but in a differencing image it
   would show the parent's older data as if it were current, and silently; zeros make the loss visible.
   Two blocks that overlap each other both become ZERO, since nothing tells which one the space really
   belongs to, and a block returning another block's data is worse than one returning zeros. A damaged
   sector bitmap entry becomes NOT_PRESENT, and the PARTIALLY_PRESENT blocks of its chunk become ZERO
   (which of their sectors are present is no longer known). BAT changes go through the log.

What cannot be repaired is reported and the image is left as it was: no valid header, no usable region
table, a damaged metadata region, a log whose entries write outside the structures. The lenient open
finds these before anything is written, so an unrepairable image is not half repaired either.
"""

from __future__ import annotations

import os
from typing import Any

from ...errors import CorruptImageError, Reason, UnsupportedError, VhdxError
from ...format.bat import BitmapState, PayloadState
from ...format.constants import REGION_TABLE_OFFSETS, REGION_TABLE_SIZE, MiB
from ..image.host import HostFactory
from ..image.loader import Finding, VhdxFile
from ..image.logged_update import LoggedUpdate, PageEdits
from ..image.posix import PosixFile


def _unrepairable(exc: VhdxError) -> str:
    """What the lenient open could not get past, said as the step that meets it (by the error's reason)."""
    what = f"{exc.field}: {exc.message}" if exc.field else exc.message
    if exc.reason is Reason.TRUNCATED:
        return "the file is smaller than the 1 MiB header section"
    if exc.reason is Reason.CORRUPT_LOG:
        return f"the log cannot be replayed: {what}"
    if exc.reason is Reason.CORRUPT_METADATA:
        return f"the metadata region is damaged: {what}"
    if exc.reason is Reason.UNSUPPORTED:
        return f"the image uses what vhdxfs does not support: {what}"
    return exc.message


class Repairer:
    """The repairs of one image opened leniently and writable, done in the order the docstring gives."""

    def __init__(self, image: VhdxFile) -> None:
        self.image = image
        self.repairs: list[str] = []
        self.wrote = False

    def _begin_writing(self) -> None:
        """2.2.2.1: before the first change, both headers are rewritten with a new FileWriteGuid."""
        self.image.headers.begin_file_writes()
        self.wrote = True

    # -- 1. headers ---------------------------------------------------------------------------------------
    def _saw(self, finding: Finding, copy: int | None = None) -> bool:
        return any(o.finding is finding and (copy is None or o.copy == copy) for o in self.image.observations)

    def headers(self) -> None:
        good = self.image.headers.index
        if self._saw(Finding.HEADER_DAMAGED, 1 - good):
            self._begin_writing()
            self.repairs.append(f"header {2 - good} was damaged; rewrote both headers from header {good + 1}")
        elif self._saw(Finding.HEADERS_DIFFER):
            self._begin_writing()
            self.repairs.append("the headers differed at the same sequence number; rewrote both from header 1")

    # -- 2. log -------------------------------------------------------------------------------------------
    def log(self) -> None:
        image = self.image
        if image.headers.log_guid is None:
            return
        entries = image.replayed_entries
        image.apply_log()  # a new FileWriteGuid first if step 1 gave none, then replay, then LogGuid cleared
        self.wrote = True
        if entries:
            self.repairs.append(f"replayed {entries} log entries and cleared the log")
        else:
            self.repairs.append("the log was marked dirty but held no complete entry; cleared it")

    # -- 3. region tables ---------------------------------------------------------------------------------
    def region_tables(self) -> None:
        image, good = self.image, self.image.region_table_copy
        other = 1 - good
        damaged = self._saw(Finding.REGION_TABLE_DAMAGED, other)
        if not damaged and not self._saw(Finding.REGION_TABLES_DIFFER):
            return
        raw = image.read_meta(REGION_TABLE_OFFSETS[good], REGION_TABLE_SIZE)
        edits = PageEdits(image.read_meta)
        edits.patch(REGION_TABLE_OFFSETS[other], raw)
        self._log(edits.changed(), atomic=True)
        self.repairs.append(f"rewrote region table copy {other + 1} from copy {good + 1} "
                            f"({'damaged' if damaged else 'it differed or was invalid'})")

    # -- 4. BAT -------------------------------------------------------------------------------------------
    def bat(self) -> None:
        image = self.image
        g, bat, bad = image.geometry, image.bat, dict(image.bad_entries)
        for index in sorted(bad):
            if g.is_bitmap_index(index):
                chunk = index // (g.chunk_ratio + 1)
                for block in range(chunk * g.chunk_ratio, min((chunk + 1) * g.chunk_ratio, g.data_blocks)):
                    if bat.payload(block)[0] == PayloadState.PARTIALLY_PRESENT:
                        bad.setdefault(g.payload_index(block), "was PARTIALLY_PRESENT in the chunk of a damaged "
                                                               "sector bitmap")
        if not bad:
            return
        for index in sorted(bad):
            if g.is_bitmap_index(index):
                chunk = index // (g.chunk_ratio + 1)
                bat.set_bitmap(chunk, BitmapState.NOT_PRESENT)
                self.repairs.append(f"BAT entry {index} (sector bitmap of chunk {chunk}) {bad[index]}; "
                                    "now NOT_PRESENT")
            else:
                block = g.block_of_index(index)
                bat.set_payload(block, PayloadState.ZERO)
                self.repairs.append(f"BAT entry {index} (payload block {block}, virtual offset "
                                    f"{block * g.block_size}) {bad[index]}; now ZERO (reads as zeros)")
        self._log(bat.take_dirty_pages(), atomic=False)

    def _log(self, pages: dict[int, bytes], *, atomic: bool) -> None:
        if not pages:
            return
        self.wrote = True
        host = self.image.host
        with LoggedUpdate(self.image) as update:  # a new FileWriteGuid first, if none yet
            size = -(-max(host.size(), *(o + len(p) for o, p in pages.items())) // MiB) * MiB
            if atomic:
                update.commit_atomic(pages, size)
            else:
                update.commit(pages, size)


def repair_image(path: str | os.PathLike[str], *, host_factory: HostFactory = PosixFile) -> dict[str, Any]:
    """Repair what can be repaired; return {'repairs': [...], 'unrepairable': str | None}.

    Raises VhdxError when the file cannot be worked on at all: not a VHDX file, in use, an I/O error.
    """
    try:
        image = VhdxFile.open(path, lenient=True, host_factory=host_factory)
    except (CorruptImageError, UnsupportedError) as exc:
        return {"repairs": [], "unrepairable": _unrepairable(exc)}
    try:
        fixer = Repairer(image)
        fixer.headers()
        fixer.log()
        fixer.region_tables()
        fixer.bat()
        if fixer.wrote:
            image.host.fdatasync()
        return {"repairs": fixer.repairs, "unrepairable": None}
    except CorruptImageError as exc:
        if image.headers.file_writes_begun:  # every write of an open comes after the new FileWriteGuid
            raise exc.with_path(path) from None
        return {"repairs": [], "unrepairable": _unrepairable(exc)}  # refused before anything was written
    except VhdxError as exc:
        raise exc.with_path(path) from None
    finally:
        image.close()
