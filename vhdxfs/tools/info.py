"""`vhdxfs info`: what an image is, read without changing a byte (a dirty log is replayed in memory)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..engine import describe
from ..sizes import format_size


def format_human(info: dict[str, Any]) -> str:
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"type: {info['type']}",
        f"virtual size: {format_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {format_size(info['actual-size'])}",
        f"allocated: {format_size(info['allocated-bytes'])} ({info['allocated-bytes']} bytes in blocks)",
        f"block size: {format_size(info['block-size'])}",
        f"logical sector size: {info['logical-sector-size']}",
        f"physical sector size: {info['physical-sector-size']}",
        f"virtual disk id: {info['virtual-disk-id']}",
        f"data write guid: {info['data-write-guid']}",
        f"log: {info['log-state']}",
    ]
    for key, value in info.get("parent-locator", {}).items():
        lines.append(f"parent {key}: {value}")
    for i, parent in enumerate(info.get("parents", []), 1):
        lines.append(f"parent {i}: {parent}")
    if "parent-error" in info:
        lines.append(f"parent: {info['parent-error']}")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("info", help="show what an image is",
                              description="Show an image's type, sizes, GUIDs and log state. Never writes to "
                                          "the image; a dirty log is replayed in memory only.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--parent", metavar="PATH", help="the parent of a differencing image, if it cannot be found")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = describe(args.image, args.parent)
    print(json.dumps(info, indent=2) if args.json else format_human(info))
    return 0
