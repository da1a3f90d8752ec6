"""`vhdxfs check [--repair]`: is the image consistent? Exit 0 clean, 2 inconsistent, 1 could not check.

The checks are the ones every open does (headers, region table, metadata, log, BAT entries in range and
apart), plus those an open can tolerate but a careful user wants to know of: a damaged second header or
region table copy, or copies that disagree. With --repair, the engine's repair fixes what it can first
(and lists it); the image is then checked afresh, so the exit status describes the repaired image. The
checks and repairs live in the engine (engine/inspect.py, engine/repair.py); this module prints them.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..engine import check_and_repair, check_image
from ..errors import VhdxError

CLEAN, COULD_NOT_CHECK, INCONSISTENT = 0, 1, 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
