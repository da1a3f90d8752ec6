"""`vhdxfs create CHILD --parent PARENT`: a differencing image that records where its parent is and
which contents (the parent's DataWriteGuid) it was made from."""

from __future__ import annotations

import os
from pathlib import Path

from ..engine.image import VhdxFile
from ..format.guids import braced
from ..format.metadata import ParentLocator
from .create import ImageSpec, write_new_image

DEFAULT_CHILD_BLOCK_SIZE = 2 << 20  # Hyper-V's default for differencing disks


def parent_locator_for(child: Path, parent: Path, data_write_guid) -> ParentLocator:
    child_dir = child.resolve().parent
    parent_abs = parent.resolve()
    relative = os.path.relpath(parent_abs, child_dir).replace("/", "\\")
    if not relative.startswith(".."):
        relative = ".\\" + relative
    return ParentLocator({
        "parent_linkage": braced(data_write_guid),
        "relative_path": relative,
        "absolute_win32_path": str(parent_abs).replace("/", "\\"),
    })


def create_child(child: str | os.PathLike, parent: str | os.PathLike, *, block_size: int | None = None,
                 log_size: int = 1 << 20) -> None:
    child, parent = Path(child), Path(parent)
    image = VhdxFile.open(parent, read_only=True)
    try:
        meta, header = image.metadata, image.header
    finally:
        image.close()
    write_new_image(child, ImageSpec(
        virtual_size=meta.virtual_size, disk_type="differencing",
        block_size=block_size or DEFAULT_CHILD_BLOCK_SIZE,
        logical_sector_size=meta.logical_sector_size, physical_sector_size=meta.physical_sector_size,
        log_size=log_size, parent_locator=parent_locator_for(child, parent, header.data_write_guid),
        virtual_disk_id=meta.virtual_disk_id))
