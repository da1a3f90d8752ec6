"""`vhdxfs create`: a new dynamic or fixed image, laid out as QEMU lays out its own (log, metadata, BAT)."""

from __future__ import annotations

import argparse
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import HostIOError, UsageError, VhdxError
from ..format import guids
from ..format.bat import Geometry, PayloadState, make_entry
from ..format.constants import (
    HEADER_OFFSETS,
    HEADER_SECTION_SIZE,
    MAX_BLOCK_SIZE,
    MAX_VIRTUAL_SIZE,
    MIN_BLOCK_SIZE,
    REGION_TABLE_OFFSETS,
    SECTOR_SIZES,
    GiB,
    MiB,
    TiB,
)
from ..format.header import Header, encode_file_identifier
from ..format.metadata import Metadata, ParentLocator, encode_region
from ..format.region import RegionEntry, RegionTable
from ..sizes import format_size, parse_size

METADATA_REGION_LENGTH = 1 * MiB


def default_block_size(virtual_size: int) -> int:
    """QEMU's choice, so images made by either tool look alike."""
    if virtual_size > 32 * TiB:
        return 64 * MiB
    if virtual_size > 100 * GiB:
        return 32 * MiB
    if virtual_size > 1 * GiB:
        return 16 * MiB
    return 8 * MiB


@dataclass
class ImageSpec:
    virtual_size: int
    disk_type: str = "dynamic"  # dynamic | fixed | differencing
    block_size: int | None = None
    logical_sector_size: int = 512
    physical_sector_size: int = 4096
    log_size: int = 1 * MiB
    parent_locator: ParentLocator | None = None
    virtual_disk_id: uuid.UUID | None = None

    def validated(self) -> ImageSpec:
        if self.logical_sector_size not in SECTOR_SIZES:
            raise UsageError(f"logical sector size {self.logical_sector_size} is not 512 or 4096",
                             field="--logical-sector-size")
        if self.physical_sector_size not in SECTOR_SIZES:
            raise UsageError(f"physical sector size {self.physical_sector_size} is not 512 or 4096",
                             field="--physical-sector-size")
        lss = self.logical_sector_size
        self.virtual_size = -(-self.virtual_size // lss) * lss
        if not 0 < self.virtual_size <= MAX_VIRTUAL_SIZE:
            raise UsageError(f"size {self.virtual_size} must be between 1 byte and 64 TiB", field="--size")
        if self.block_size is None:
            self.block_size = default_block_size(self.virtual_size)
        bs = self.block_size
        if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
            raise UsageError(f"block size {bs} must be a power of two from 1 MiB to 256 MiB", field="--block-size")
        if self.log_size < MiB or self.log_size % MiB or self.log_size > 1024 * MiB:
            raise UsageError(f"log size {self.log_size} must be a multiple of 1 MiB up to 1 GiB", field="--log-size")
        return self


def write_new_image(path: str | os.PathLike, spec: ImageSpec) -> None:
    """Create ``path`` (which must not exist) as a valid empty image; remove it again on failure."""
    spec = spec.validated()
    meta = Metadata(
        block_size=spec.block_size, virtual_size=spec.virtual_size,
        logical_sector_size=spec.logical_sector_size, physical_sector_size=spec.physical_sector_size,
        virtual_disk_id=spec.virtual_disk_id or guids.new_guid(),
        leave_block_allocated=spec.disk_type == "fixed",
        has_parent=spec.disk_type == "differencing", parent_locator=spec.parent_locator,
    )
    meta.validate()
    geometry = Geometry(spec.virtual_size, spec.block_size, spec.logical_sector_size, meta.has_parent)
    log_offset = HEADER_SECTION_SIZE
    meta_offset = log_offset + spec.log_size
    bat_offset = meta_offset + METADATA_REGION_LENGTH
    payload_offset = bat_offset + geometry.bat_region_length
    regions = RegionTable((RegionEntry(guids.BAT_REGION, bat_offset, geometry.bat_region_length, True),
                           RegionEntry(guids.METADATA_REGION, meta_offset, METADATA_REGION_LENGTH, True)))
    header = Header(sequence_number=1, file_write_guid=guids.new_guid(), data_write_guid=guids.new_guid(),
                    log_guid=guids.NULL_GUID, log_length=spec.log_size, log_offset=log_offset)
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise VhdxError("already exists; remove it first or pick another name", path=path) from None
    except OSError as exc:
        raise HostIOError(exc.strerror or str(exc), path=path, errno=exc.errno) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode_file_identifier())
            for i, off in enumerate(HEADER_OFFSETS):
                f.seek(off)
                f.write(header.next().encode() if i else header.encode())
            for off in REGION_TABLE_OFFSETS:
                f.seek(off)
                f.write(regions.encode())
            f.seek(meta_offset)
            f.write(encode_region(meta, METADATA_REGION_LENGTH))
            end = payload_offset
            if spec.disk_type == "fixed":
                end = _write_fixed_bat(f, geometry, bat_offset, payload_offset)
            f.truncate(end)
            # Reserve the log and metadata regions now, so journaling never meets a full host disk.
            os.posix_fallocate(f.fileno(), log_offset, payload_offset - log_offset)
            if spec.disk_type == "fixed":
                os.posix_fallocate(f.fileno(), payload_offset, end - payload_offset)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise HostIOError(exc.strerror or str(exc), path=path, errno=exc.errno) from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _write_fixed_bat(f, geometry: Geometry, bat_offset: int, payload_offset: int) -> int:
    """Every payload block FULLY_PRESENT, laid out in order after the BAT; returns the file's end."""
    from array import array

    entries = array("Q", bytes(8 * geometry.total_entries))
    for block in range(geometry.data_blocks):
        entries[geometry.payload_index(block)] = make_entry(PayloadState.FULLY_PRESENT,
                                                            payload_offset + block * geometry.block_size)
    f.seek(bat_offset)
    f.write(entries.tobytes())
    return payload_offset + geometry.data_blocks * geometry.block_size


def register(subparsers: argparse._SubParsersAction) -> None:
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
    p.add_argument("--logical-sector-size", type=int, choices=SECTOR_SIZES, default=512)
    p.add_argument("--physical-sector-size", type=int, choices=SECTOR_SIZES, default=4096)
    p.add_argument("--log-size", default="1M", help="size of the metadata log (default 1M)")
    p.add_argument("--parent", metavar="PARENT", help="make a differencing child of PARENT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.parent:
        from .differencing import create_child

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
        write_new_image(args.image, spec)
    except UsageError as exc:
        raise exc.with_path(args.image) from None
    print(f"created {args.image}: {spec.disk_type}, {format_size(spec.virtual_size)}, "
          f"block size {format_size(spec.block_size)}")
    return 0
