"""New images: a dynamic, fixed or differencing VHDX file, laid out as QEMU lays out its own.

Layout (all 1 MiB aligned): the header section, the log, the metadata region, the BAT region, then the
payload blocks (a fixed image gets all of them now, in order). QEMU's layout is kept so that images made
by either tool look alike to people comparing them, and so `vhdxfs resize` meets the same shapes.

A differencing child records where its parent is and which contents it was made from (the parent's
DataWriteGuid as parent_linkage, spec 2.6.2.6): it lives here with plain image creation, since it is
the same layout with a parent locator in it.
"""

from __future__ import annotations

import os
import uuid
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar

from ...errors import HostIOError, Reason, UsageError, VhdxError
from ...format import guids
from ...format.bat import Geometry, PayloadState, make_entry
from ...format.constants import (
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
from ...format.header import Header, encode_file_identifier
from ...format.metadata import Metadata, ParentLocator, encode_region
from ...format.region import RegionEntry, RegionTable
from ..image.loader import VhdxFile
from ..image.locations import Location, S3Location, local
from ..image.parents import URL_KEY

METADATA_REGION_LENGTH = 1 * MiB
DEFAULT_CHILD_BLOCK_SIZE = 2 * MiB  # Hyper-V's default for differencing disks


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
    """What a new image is to be. ``validated()`` fills in the block size and refuses what VHDX cannot hold;
    the error fields name the command-line options, as the CLI is the usual source of a bad value."""

    sector_sizes: ClassVar[tuple[int, ...]] = SECTOR_SIZES  # the logical/physical sector sizes VHDX allows

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


def create_image(path: str | os.PathLike[str], spec: ImageSpec) -> None:
    """Create ``path`` (which must not exist) as a valid empty image; remove it again on failure."""
    spec = spec.validated()
    block_size = spec.block_size
    assert block_size is not None, "validated() chose one"
    meta = Metadata(
        block_size=block_size, virtual_size=spec.virtual_size,
        logical_sector_size=spec.logical_sector_size, physical_sector_size=spec.physical_sector_size,
        virtual_disk_id=spec.virtual_disk_id or guids.new_guid(),
        leave_block_allocated=spec.disk_type == "fixed",
        has_parent=spec.disk_type == "differencing", parent_locator=spec.parent_locator,
    )
    meta.validate()
    geometry = Geometry(spec.virtual_size, block_size, spec.logical_sector_size, meta.has_parent)
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
        raise VhdxError("already exists; remove it first or pick another name", path=path,
                        reason=Reason.EXISTS) from None
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


def _write_fixed_bat(f: BinaryIO, geometry: Geometry, bat_offset: int, payload_offset: int) -> int:
    """Every payload block FULLY_PRESENT, laid out in order after the BAT; returns the file's end."""
    entries = array("Q", bytes(8 * geometry.total_entries))
    for block in range(geometry.data_blocks):
        entries[geometry.payload_index(block)] = make_entry(PayloadState.FULLY_PRESENT,
                                                            payload_offset + block * geometry.block_size)
    f.seek(bat_offset)
    f.write(entries.tobytes())
    return payload_offset + geometry.data_blocks * geometry.block_size


def parent_locator_for(child: Location, parent: Location, data_write_guid: uuid.UUID) -> ParentLocator:
    """The locator a new child stores: the parent's contents (DataWriteGuid) and two ways to find it. A parent
    in an object store is named by its URL (``url``, engine/image/parents.py), and both path entries name the
    place of a downloaded copy next to the child (the object's file name there), where any reader finds it:
    libvhdi (as Debian ships it) takes the file name of absolute_win32_path and looks beside the child."""
    child = local(child, "a new child")
    if isinstance(parent, S3Location):
        beside = child.resolve().parent / parent.name
        return ParentLocator({"parent_linkage": guids.braced(data_write_guid), "relative_path": ".\\" + parent.name,
                              "absolute_win32_path": str(beside).replace("/", "\\"), URL_KEY: str(parent)})
    child_dir = child.resolve().parent
    parent_abs = parent.resolve()
    relative = os.path.relpath(parent_abs, child_dir).replace("/", "\\")
    if not relative.startswith(".."):
        relative = ".\\" + relative
    return ParentLocator({
        "parent_linkage": guids.braced(data_write_guid),
        "relative_path": relative,
        "absolute_win32_path": str(parent_abs).replace("/", "\\"),
    })


def create_child(child: str | os.PathLike[str], parent: str | os.PathLike[str] | S3Location, *,
                 block_size: int | None = None,
                 log_size: int = 1 * MiB) -> None:
    """Create ``child`` as a differencing image of ``parent``: its size, sector sizes and disk id."""
    image = VhdxFile.open(parent, read_only=True)
    try:
        create_child_of(child, image, block_size=block_size, log_size=log_size)
    finally:
        image.close()


def create_child_of(child: str | os.PathLike[str], parent: VhdxFile, *, block_size: int | None = None,
                    log_size: int = 1 * MiB) -> None:
    """Create ``child`` as a differencing image of the image ``parent`` opened already (a live checkpoint
    makes one of the top it writes, whose exclusive lock keeps a second open out), durably: the file and
    its directory entry."""
    child = Path(child)
    meta, header = parent.metadata, parent.header
    create_image(child, ImageSpec(
        virtual_size=meta.virtual_size, disk_type="differencing",
        block_size=block_size or DEFAULT_CHILD_BLOCK_SIZE,
        logical_sector_size=meta.logical_sector_size, physical_sector_size=meta.physical_sector_size,
        log_size=log_size, parent_locator=parent_locator_for(child, parent.path, header.data_write_guid),
        virtual_disk_id=meta.virtual_disk_id))
    folder = os.open(child.resolve().parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
