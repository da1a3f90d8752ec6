"""`vhdxfs create`: a new dynamic, fixed or differencing image (the layout is the engine's: engine/layout.py)."""

from __future__ import annotations

import argparse

from ..engine import ImageSpec, create_child, create_image
from ..errors import UsageError
from ..sizes import format_size, parse_size


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "create", help="create a new VHDX image",
        description="Create a new, empty VHDX image. Sizes take binary suffixes: 512M, 10G, 2T. With --parent, "
                    "create a differencing child of PARENT (same size and sector size).")
    p.add_argument("image", metavar="IMAGE", help="the file to create (must not exist)")
    p.add_argument("--size", help="virtual disk size, up to 64T (not with --parent)")
    p.add_argument("--type", choices=("dynamic", "fixed"), default="dynamic",
                   help="dynamic grows as written (default); fixed allocates every block now")
    p.add_argument("--block-size", help="payload block size, a power of two from 1M to 256M "
                   "(default by size, as QEMU: 8M up to 1G, 16M up to 100G, 32M up to 32T, else 64M)")
    p.add_argument("--logical-sector-size", type=int, choices=ImageSpec.sector_sizes, default=512)
    p.add_argument("--physical-sector-size", type=int, choices=ImageSpec.sector_sizes, default=4096)
    p.add_argument("--log-size", default="1M", help="size of the metadata log (default 1M)")
    p.add_argument("--parent", metavar="PARENT", help="make a differencing child of PARENT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.parent:
        if args.size:
            raise UsageError("--size cannot be given with --parent: a child has its parent's size", field="--size")
        create_child(args.image, args.parent, block_size=parse_size(args.block_size, "--block-size")
                     if args.block_size else None, log_size=parse_size(args.log_size, "--log-size"))
        return 0
    if not args.size:
        raise UsageError("--size is required (for example --size 10G)", path=args.image, field="--size")
    spec = ImageSpec(
        virtual_size=parse_size(args.size, "--size"), disk_type=args.type,
        block_size=parse_size(args.block_size, "--block-size") if args.block_size else None,
        logical_sector_size=args.logical_sector_size, physical_sector_size=args.physical_sector_size,
        log_size=parse_size(args.log_size, "--log-size"))
    try:
        create_image(args.image, spec)
    except UsageError as exc:
        raise exc.with_path(args.image) from None
    print(f"created {args.image}: {spec.disk_type}, {format_size(spec.virtual_size)}, "
          f"block size {format_size(spec.block_size)}")
    return 0
