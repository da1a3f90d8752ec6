"""``vhdxfs.create``: a new image, as `vhdxfs create` makes it, from Python."""

from __future__ import annotations

import os

from ..engine import ImageSpec, create_child, create_image
from ..errors import UsageError
from ..sizes import parse_size


def _size(value: int | str | None, what: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    return parse_size(value, what)


def create(path: str | os.PathLike[str], size: int | str | None = None, *, parent: str | os.PathLike[str] | None = None,
           block_size: int | str | None = None, logical_sector_size: int = 512, physical_sector_size: int = 4096,
           fixed: bool = False, log_size: int | str = "1M") -> None:
    """Create ``path`` (it must not exist): a dynamic image of ``size`` bytes ("10G" works too), a fixed one
    with ``fixed=True``, or, with ``parent``, a differencing child of that image (same size and sectors).
    ``block_size`` defaults as QEMU's (8M up to 1G, 16M up to 100G, 32M up to 32T, else 64M; 2M for a child).
    """
    log = _size(log_size, "log_size")
    if parent is not None:
        if size is not None:
            raise UsageError("a child has its parent's size: give size or parent, not both", path=path,
                             field="size")
        create_child(path, parent, block_size=_size(block_size, "block_size"), log_size=log)
        return
    if size is None:
        raise UsageError("size is required (for example size='10G')", path=path, field="size")
    try:
        create_image(path, ImageSpec(_size(size, "size"), disk_type="fixed" if fixed else "dynamic",
                                     block_size=_size(block_size, "block_size"),
                                     logical_sector_size=logical_sector_size,
                                     physical_sector_size=physical_sector_size, log_size=log))
    except UsageError as exc:
        raise exc.with_path(path) from None
