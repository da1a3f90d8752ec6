"""Opening a disk: the image and, for a differencing image, its parents, each checked against its child;
and the changes of a layer's mode that live operations make (``freeze``, ``thaw``).

The parents open read-only with shared locks; the top opens as asked. A failure anywhere closes what
was opened. The result is the top layer, numbered (``DiskCore.chain``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from ...errors import ParentError, Reason, VhdxError
from ..image import chainrecord, parents
from ..image.host import HostFactory
from ..image.loader import VhdxFile
from ..image.locations import S3Location, local, real
from ..image.posix import PosixFile
from .core import DiskCore


def open_chain(path: str | os.PathLike[str] | S3Location, *, read_only: bool = False,
               parent: str | os.PathLike[str] | S3Location | None = None,
               host_factory: HostFactory = PosixFile, data_write_guid: uuid.UUID | None = None,
               allow_frozen: bool = False) -> DiskCore:
    """Open an image (blocking); a differencing image opens its parent chain (read-only, shared locks). A
    writable open of a frozen layer (engine/image/chainrecord.py) is refused: its checkpoints depend on it."""
    top = _open(path, read_only, parent, host_factory, data_write_guid, ()).chain()
    if not read_only and not allow_frozen:
        try:
            chainrecord.check_not_frozen(local(top.path, "a writable open"), anchor(top))
        except BaseException:
            top.close_files()
            raise
    return top


def _open(path: str | os.PathLike[str] | S3Location, read_only: bool,
          parent: str | os.PathLike[str] | S3Location | None,
          host_factory: HostFactory, data_write_guid: uuid.UUID | None, below_of: tuple[str, ...]) -> DiskCore:
    image = VhdxFile.open(path, read_only=read_only, host_factory=host_factory, data_write_guid=data_write_guid)
    if not image.is_differencing:
        return DiskCore(image, None)
    try:
        chain = (*below_of, real(path))
        if len(chain) > parents.MAX_CHAIN_DEPTH:
            raise ParentError(f"parent chain is deeper than {parents.MAX_CHAIN_DEPTH}", path=chain[0],
                              reason=Reason.PARENT_CHAIN)
        parent_path = parents.find_parent(image.path, image.metadata, parent)
        if real(parent_path) in chain:
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


def anchor(top: DiskCore) -> Path:
    """Where the chain record of ``top``'s chain lives: beside its base, or beside the lowest local layer when
    the base is in an object store (engine/image/chainrecord.py)."""
    return next(layer.path for layer in reversed(top.layers()) if isinstance(layer.path, Path))


def freeze(layer: DiskCore) -> None:
    """``layer`` is only read from now on: a checkpoint's parent. Flush it and clear its log first
    (``DiskCore.flush``, ``Flusher.finish``); its host file's lock turns shared (blocking)."""
    layer.image.host.set_writable(False)
    layer.headers.freeze()
    layer.read_only = layer.image.read_only = True


def thaw(layer: DiskCore, data_write_guid: uuid.UUID) -> None:
    """``layer`` is writable again: the target of a live merge (blocking). Its host file's lock turns
    exclusive (or ImageLockedError, nothing changed, while another process reads it); a log replayed in
    memory at open goes into the file (then ``chain`` the top again); the first write sets
    ``data_write_guid``."""
    layer.image.host.set_writable(True)
    layer.headers.thaw(data_write_guid)
    layer.read_only = layer.image.read_only = False
    if layer.image.overlay is not None:
        layer.image.apply_log()
