"""`vhdxfs check`: is the image consistent? Exit 0 clean, 2 inconsistent, 1 could not check.

The checks are the ones every open does (headers, region table, metadata, log, BAT entries in range and
apart), plus those an open can tolerate but a careful user wants to know of: a damaged second header or
region table copy, or copies that disagree.
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


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("check", help="check an image for consistency",
                              description="Check headers, region tables, metadata, the log and every BAT entry. "
                                          "Exit status: 0 clean, 2 inconsistent, 1 could not check.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--parent", metavar="PATH", help="the parent of a differencing image, if it cannot be found")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        report = check_image(args.image, args.parent)
    except VhdxError as exc:
        if args.json:
            print(json.dumps({"filename": args.image, "status": "could-not-check", "errors": [str(exc)]}, indent=2))
        else:
            print(f"vhdxfs: {exc}", file=sys.stderr)
        return COULD_NOT_CHECK
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for line in report["errors"]:
            print(f"ERROR: {line}")
        for line in report["warnings"]:
            print(f"Warning: {line}")
        for line in report["notes"]:
            print(f"Note: {line}")
        if report["status"] == "clean":
            print(f"No errors were found on the image ({report['allocated-blocks']} blocks allocated).")
    return CLEAN if report["status"] == "clean" else INCONSISTENT
