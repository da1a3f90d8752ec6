"""`vhdxfs commit CHILD`: merge a differencing child into its parent.

The merge, and how the child stays a valid child of its parent at every instant (MS-VHDX note 12), is
the engine's: engine/merge.py. This module parses the arguments and prints the result.
"""

from __future__ import annotations

import argparse

from ..engine import commit
from ..sizes import format_size
from .progress import progress


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    result = commit(args.child, args.parent, progress=progress)
    print(f"committed {args.child} into {result.parent}: {format_size(result.copied)} of data, "
          f"{format_size(result.zeroed)} of zeros")
    return 0
