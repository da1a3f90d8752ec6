"""`vhdxfs map IMAGE [--json]`: which ranges of the virtual disk hold data, read as zeros, or are unallocated,
and which file of a chain holds each. Never writes (a dirty log is replayed in memory)."""

from __future__ import annotations

import argparse
import json
from typing import NotRequired, TypedDict

from ..sizes import format_size


class MapItem(TypedDict):
    """One object of qemu-img map's JSON output, plus the file of the chain that holds the range."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: NotRequired[int]  # where the data lies in the file: only for data
    layer: str


def extents_as_qemu_map(path: str, parent: str | None = None) -> list[MapItem]:
    """qemu-img map's JSON objects (start, length, depth, present, zero, data, offset) plus ``layer``."""
    from ..engine import Disk, Kind

    out = []
    with Disk.open(path, read_only=True, parent=parent) as disk:
        for e in disk.extents():
            item: MapItem
            if e.kind == Kind.DATA:  # the keys in qemu-img's order, ``layer`` last
                item = {"start": e.offset, "length": e.length, "depth": e.depth, "present": True, "zero": False,
                        "data": True, "offset": e.file_offset, "layer": str(e.layer)}
            else:
                item = {"start": e.offset, "length": e.length, "depth": e.depth, "present": e.kind != Kind.HOLE,
                        "zero": True, "data": False, "layer": str(e.layer)}
            out.append(item)
    return out


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "map", help="show which ranges of the disk hold data",
        description="List the extents of IMAGE's virtual disk: data (with the file offset where it lies), zero "
                    "(blocks that read as zeros by their state) and hole (unallocated), and, in a differencing "
                    "chain, the file that holds each (depth 0 is IMAGE itself). --json prints qemu-img map's "
                    "objects plus a 'layer' field. Never writes to the image.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="qemu-img map --output=json's format, plus 'layer'")
    p.add_argument("--parent", metavar="PATH", help="the parent of a differencing image, if it cannot be found")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    items = extents_as_qemu_map(args.image, args.parent)
    if args.json:
        print(json.dumps(items, indent=1))
        return 0
    print(f"{'Offset':>16} {'Length':>16} {'Kind':6} {'Depth':>5} {'File offset':>16}  File")
    for item in items:
        kind = "data" if item["data"] else "zero" if item["present"] else "hole"
        where = f"{item['offset']:#18x}" if item["data"] else " " * 18
        print(f"{item['start']:#16x} {item['length']:#16x} {kind:6} {item['depth']:5} {where}  {item['layer']}")
    data = sum(i["length"] for i in items if i["data"])
    print(f"{format_size(data)} of data in {sum(1 for i in items if i['data'])} extents")
    return 0
