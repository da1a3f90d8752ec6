"""`vhdxfs info`: what an image is, read without changing a byte (a dirty log is replayed in memory)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import trio

from ..engine.disk import VirtualDisk
from ..engine.image import VhdxFile
from ..errors import VhdxError
from ..sizes import format_size


def parent_chain(path: str, parent: str | None = None) -> list[str]:
    """The parents of a differencing image, nearest first (opened read-only, never written)."""

    async def walk() -> list[str]:
        disk = await VirtualDisk.open(path, read_only=True, parent=parent)
        try:
            return [str(p) for p in disk.chain()[1:]]
        finally:
            await disk.close()

    return trio.run(walk)


def describe(path: str, parent: str | None = None) -> dict[str, Any]:
    """Facts about the image as a JSON-ready dict."""
    image = VhdxFile.open(path, read_only=True)
    try:
        m, h = image.metadata, image.header
        st = os.stat(path)
        info: dict[str, Any] = {
            "filename": str(path),
            "format": "vhdx",
            "type": image.disk_type,
            "virtual-size": m.virtual_size,
            "actual-size": st.st_blocks * 512,
            "file-size": st.st_size,
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


def register(subparsers: argparse._SubParsersAction) -> None:
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
