"""Looking at an image without changing a byte: what it is (``describe``) and whether it is sound
(``check_image``), plus ``check_and_repair``, which repairs first and then checks afresh.

Both read through the one loader (image.py), read-only, so a dirty log is replayed in memory only. The
checks are the ones every open does (headers, region table, metadata, log, BAT entries in range and
apart): what a strict open refuses makes the image inconsistent, with the open's own message. On top of
that come what an open tolerates but a careful user wants to know of, which the loader records in
``observations``: a damaged header or region table copy (warnings) and region table copies that differ
(an error: which one is right cannot be told from the image alone).

The reports are plain dicts, ready for JSON, so the CLI only prints them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ...errors import CorruptImageError, VhdxError
from ..disk.sync import Disk
from ..image.host import HostFactory
from ..image.loader import Finding, VhdxFile
from ..image.locations import S3Location
from ..image.posix import PosixFile
from .repair import repair_image

# Findings of the loader that make an image inconsistent; the rest are warnings.
_ERRORS = {Finding.REGION_TABLES_DIFFER}


def parent_chain(path: str | os.PathLike[str] | S3Location, parent: str | os.PathLike[str] | S3Location | None = None,
                 *,
                 host_factory: HostFactory = PosixFile) -> list[str]:
    """The parents of a differencing image, nearest first (opened read-only, never written)."""
    with Disk.open(path, read_only=True, parent=parent, host_factory=host_factory) as disk:
        return [str(p) for p in disk.chain()[1:]]


def describe(path: str | os.PathLike[str] | S3Location, parent: str | os.PathLike[str] | S3Location | None = None
             ) -> dict[str, Any]:
    """Facts about the image as a JSON-ready dict; a missing parent is reported, not raised."""
    image = VhdxFile.open(path, read_only=True)
    try:
        m, h = image.metadata, image.header
        if isinstance(image.path, Path):
            st = os.stat(image.path)
            actual, size, remote = st.st_blocks * 512, st.st_size, {}
        else:  # an object in a store: what it takes there, and the ETag it was read at
            actual = size = image.host.size()
            remote = {"etag": getattr(image.host, "etag", None)}
        info: dict[str, Any] = {
            "filename": str(path),
            "format": "vhdx",
            "type": image.disk_type,
            "virtual-size": m.virtual_size,
            "actual-size": actual,
            "file-size": size,
            **remote,
            "allocated-bytes": sum(n for _o, n, _i in image.bat.allocated_ranges()),
            "block-size": m.block_size,
            "logical-sector-size": m.logical_sector_size,
            "physical-sector-size": m.physical_sector_size,
            "virtual-disk-id": str(m.virtual_disk_id),
            "file-write-guid": str(h.file_write_guid),
            "data-write-guid": str(h.data_write_guid),
            "log-guid": str(h.log_guid),
            "log-offset": h.log_offset,
            "log-length": h.log_length,
            "log-state": "clean" if h.log_is_empty else f"dirty ({image.replayed_entries} entries to replay)",
            "log-dirty": not h.log_is_empty,
            "log-entries-to-replay": image.replayed_entries,
            "header-sequence-number": h.sequence_number,
            "creator": image.creator,
        }
        if m.has_parent and m.parent_locator is not None:
            info["parent-locator"] = dict(m.parent_locator.entries)
    finally:
        image.close()
    info["parents"] = []  # the parent chain, nearest first; empty for a dynamic or fixed image
    if info["type"] == "differencing":
        try:
            info["parents"] = parent_chain(path, parent)
        except VhdxError as exc:
            info["parent-error"] = str(exc)
    return info


def check_image(path: str | os.PathLike[str], parent: str | os.PathLike[str] | None = None, *,
                host_factory: HostFactory = PosixFile) -> dict[str, Any]:
    """Report as a dict: status ('clean' | 'inconsistent'), errors, warnings, notes.

    Raises VhdxError when the image cannot be checked at all: not a VHDX file, in use, an I/O error, a
    differencing image whose parent is missing or does not match.
    """
    report: dict[str, Any] = {"filename": str(path), "errors": [], "warnings": [], "notes": []}
    try:
        image = VhdxFile.open(path, read_only=True, host_factory=host_factory)
    except CorruptImageError as exc:
        report["errors"].append(str(exc))
        report["status"] = "inconsistent"
        return report
    try:
        for seen in image.observations:
            report["errors" if seen.finding in _ERRORS else "warnings"].append(seen.message)
        if not image.header.log_is_empty:
            report["notes"].append(f"the log is dirty: {image.replayed_entries} entries will be replayed on the "
                                   "next writable open (read-only opens replay in memory)")
        blocks = image.space_map().blocks
        report["allocated-blocks"] = len(blocks)
        report["image-end-offset"] = max([s.end for s in blocks] + [image.file_size()])
        differencing = image.is_differencing
    finally:
        image.close()
    if differencing:
        # a missing or mismatched parent: could not check (raises)
        report["parents"] = parent_chain(path, parent, host_factory=host_factory)
    report["status"] = "inconsistent" if report["errors"] else "clean"
    return report


def check_and_repair(path: str | os.PathLike[str], parent: str | os.PathLike[str] | None = None, *,
                     host_factory: HostFactory = PosixFile) -> dict[str, Any]:
    """Repair what can be repaired, then check the result; the report lists the repairs."""
    outcome = repair_image(Path(path), host_factory=host_factory)
    report = check_image(path, parent, host_factory=host_factory)
    report["repairs"] = outcome["repairs"]
    if outcome["unrepairable"]:
        report["unrepairable"] = outcome["unrepairable"]
        report["errors"].insert(0, f"could not repair: {outcome['unrepairable']}")
        report["status"] = "inconsistent"
    return report
