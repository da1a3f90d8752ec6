"""Opening a disk: the image and, for a differencing image, its parents, each checked against its child.

The parents open read-only with shared locks; the top opens as asked. A failure anywhere closes what
was opened. The result is the top layer, numbered (``DiskCore.chain``).
"""

from __future__ import annotations

import os
import uuid

from ...errors import ParentError, Reason, VhdxError
from ..image import parents
from ..image.host import HostFactory, PosixFile
from ..image.loader import VhdxFile
from .core import DiskCore


def open_chain(path: str | os.PathLike[str], *, read_only: bool = False, parent: str | os.PathLike[str] | None = None,
               host_factory: HostFactory = PosixFile, data_write_guid: uuid.UUID | None = None) -> DiskCore:
    """Open an image (blocking); a differencing image opens its parent chain (read-only, shared locks)."""
    return _open(path, read_only, parent, host_factory, data_write_guid, ()).chain()


def _open(path: str | os.PathLike[str], read_only: bool, parent: str | os.PathLike[str] | None,
          host_factory: HostFactory, data_write_guid: uuid.UUID | None, below_of: tuple[str, ...]) -> DiskCore:
    image = VhdxFile.open(path, read_only=read_only, host_factory=host_factory, data_write_guid=data_write_guid)
    if not image.is_differencing:
        return DiskCore(image, None)
    try:
        chain = (*below_of, os.path.realpath(path))
        if len(chain) > parents.MAX_CHAIN_DEPTH:
            raise ParentError(f"parent chain is deeper than {parents.MAX_CHAIN_DEPTH}", path=chain[0],
                              reason=Reason.PARENT_CHAIN)
        parent_path = parents.find_parent(image.path, image.metadata, parent)
        if os.path.realpath(parent_path) in chain:
            raise ParentError(f"parent chain loops back to {parent_path}", path=path, reason=Reason.PARENT_CHAIN)
        below = _open(parent_path, True, None, host_factory, None, chain)
        try:
            parents.check_parent(image.path, image.metadata, parent_path, below.image.metadata,
                                 below.image.header.data_write_guid)
        except VhdxError:
            below.close_files()
            raise
    except BaseException:
        image.close()
        raise
    return DiskCore(image, below)
