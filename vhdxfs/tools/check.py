"""`vhdxfs check [--repair]`: is the image consistent? Exit 0 clean, 2 inconsistent, 1 could not check.

The checks are the ones every open does (headers, region table, metadata, log, BAT entries in range and
apart), plus those an open can tolerate but a careful user wants to know of: a damaged second header or
region table copy, or copies that disagree. With --repair, repair.py fixes what it can first (and lists
it); the image is then checked afresh, so the exit status describes the repaired image.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..engine.image import VhdxFile
from ..errors import CorruptImageError, VhdxError
from ..format.constants import HEADER_OFFSETS, HEADER_SIZE, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE
from ..format.header import Header
from ..format.region import RegionTable

CLEAN, COULD_NOT_CHECK, INCONSISTENT = 0, 1, 2


def check_image(path: str, parent: str | None = None) -> dict[str, Any]:
    """Report as a dict: status ('clean' | 'inconsistent'), errors, warnings, notes."""
    report: dict[str, Any] = {"filename": str(path), "errors": [], "warnings": [], "notes": []}
    try:
        image = VhdxFile.open(path, read_only=True)
    except CorruptImageError as exc:
        report["errors"].append(str(exc))
        report["status"] = "inconsistent"
        return report
    try:
        host = image.host
        headers = [Header.decode(host.pread(off, HEADER_SIZE)) for off in HEADER_OFFSETS]
        for i, h in enumerate(headers):
            if h is None:
                report["warnings"].append(f"header {i + 1} is damaged; the other one is in use")
        tables = [RegionTable.decode(image.read_meta(off, REGION_TABLE_SIZE)) for off in REGION_TABLE_OFFSETS]
        for i, t in enumerate(tables):
            if t is None:
                report["warnings"].append(f"region table copy {i + 1} is damaged")
        if all(tables) and tables[0] != tables[1]:
            report["errors"].append("the two region table copies differ")
        if not image.header.log_is_empty:
            report["notes"].append(f"the log is dirty: {image.replayed_entries} entries will be replayed on the "
                                   "next writable open (read-only opens replay in memory)")
        ranges = image.bat.allocated_ranges()
        report["allocated-blocks"] = len(ranges)
        report["image-end-offset"] = max([o + n for o, n, _ in ranges] + [image.file_size()])
        differencing = image.is_differencing
    finally:
        image.close()
    if differencing:
        from .info import parent_chain

        report["parents"] = parent_chain(path, parent)  # a missing or mismatched parent: could not check
    report["status"] = "inconsistent" if report["errors"] else "clean"
    return report


def check_and_repair(path: str, parent: str | None = None) -> dict[str, Any]:
    """Repair what can be repaired, then check the result; the report lists the repairs."""
    from .repair import repair_image

    outcome = repair_image(path)
    report = check_image(path, parent)
    report["repairs"] = outcome["repairs"]
    if outcome["unrepairable"]:
        report["unrepairable"] = outcome["unrepairable"]
        report["errors"].insert(0, f"could not repair: {outcome['unrepairable']}")
        report["status"] = "inconsistent"
    return report


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check", help="check an image for consistency (and repair it)",
        description="Check headers, region tables, metadata, the log and every BAT entry. Never writes to the "
                    "image unless --repair is given. With --repair: replay a dirty log; rewrite a damaged header "
                    "or region table copy from the good one; turn BAT entries that point outside the file or "
                    "overlap the image's structures or each other into ZERO blocks (they read as zeros; their "
                    "old contents cannot be trusted); then check again and list every repair. "
                    "Exit status: 0 clean (with --repair: clean after the repairs), 2 inconsistent (with "
                    "--repair: damage remains that could not be repaired), 1 could not check (not a VHDX file, "
                    "in use, I/O error, parent missing).")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--repair", action="store_true", help="fix what can be fixed, then check (the image must "
                   "not be in use)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--parent", metavar="PATH", help="the parent of a differencing image, if it cannot be found")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        report = check_and_repair(args.image, args.parent) if args.repair else check_image(args.image, args.parent)
    except VhdxError as exc:
        if args.json:
            print(json.dumps({"filename": args.image, "status": "could-not-check", "errors": [str(exc)]}, indent=2))
        else:
            print(f"vhdxfs: {exc}", file=sys.stderr)
        return COULD_NOT_CHECK
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for line in report.get("repairs", []):
            print(f"Repaired: {line}")
        for line in report["errors"]:
            print(f"ERROR: {line}")
        for line in report["warnings"]:
            print(f"Warning: {line}")
        for line in report["notes"]:
            print(f"Note: {line}")
        if report["status"] == "clean":
            print(f"No errors were found on the image ({report['allocated-blocks']} blocks allocated).")
    return CLEAN if report["status"] == "clean" else INCONSISTENT
