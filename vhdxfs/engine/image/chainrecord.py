"""The chain record: which file is the top of a chain that live checkpoints made, next to its base.

Why a record: after ``vhdxfs checkpoint`` the running disk writes into ``disk_<GUID>.avhdx`` while
``disk.vhdx`` and the checkpoints below the top are frozen: their children depend on their contents (their
DataWriteGuid), so one more write into a frozen layer would break every layer above it. A user, the
systemd unit and the fstab line still name ``disk.vhdx``. Hyper-V keeps the current top in the VM's own
configuration; vhdxfs keeps it in ``disk.vhdx.chain`` beside the base:

    {"format": "vhdxfs-chain", "version": 1, "layers": ["disk.vhdx", "disk_<G1>.avhdx", "disk_<G2>.avhdx"]}

base first, top last, each name relative to the base's directory. A writable mount or serve of any layer
of the chain opens the top instead (``top_of``); every other writable open of a frozen layer is refused
(``check_not_frozen``), so nothing breaks the children. Read-only opens of any layer are always fine: that
is how a checkpoint is read while the disk runs.

Only the daemon that holds the top (exclusively locked) changes the record: a checkpoint adds the new
top after the new file is durable and before the disk switches to it; a merge removes the merged layer
after its child no longer needs it. Each write is atomic (a new file renamed over the old, both made
durable), so a crash leaves the old record or the new one, and every step is ordered so that either names
a chain that opens with every flushed write. A chain back to its base alone has no record.

A base in an object store (``s3://``) is never written, so it needs no record: the record lives beside the
lowest local layer instead (the *anchor*, ``base_of``), and lists the chain from there up.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from ...errors import Reason, VhdxError
from .loader import VhdxFile
from .parents import MAX_CHAIN_DEPTH, find_parent
from .posix import PosixFile

SUFFIX = ".chain"
_FORMAT = "vhdxfs-chain"


def record_path(base: Path) -> Path:
    return base.with_name(base.name + SUFFIX)


def read_layers(base: str | os.PathLike[str]) -> list[Path] | None:
    """The chain recorded beside ``base``, base first (absolute paths), or None when there is no record."""
    base = Path(base)
    path = record_path(base)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise VhdxError(f"cannot read the chain record: {exc}", path=path, reason=Reason.CORRUPT_METADATA) from None
    layers = data.get("layers") if isinstance(data, dict) and data.get("format") == _FORMAT else None
    if not isinstance(layers, list) or not layers or not all(isinstance(n, str) for n in layers):
        raise VhdxError("not a vhdxfs chain record (no list of layers)", path=path, reason=Reason.CORRUPT_METADATA)
    folder = base.resolve().parent
    return [(folder / name).resolve() for name in layers]


def write_layers(base: str | os.PathLike[str], layers: list[Path]) -> None:
    """Record ``layers`` (base first) beside ``base``, atomically and durably; a chain of the base alone
    removes the record."""
    base = Path(base)
    path = record_path(base)
    if len(layers) <= 1:
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _sync_folder(path.parent)
        return
    folder = base.resolve().parent
    names = [os.path.relpath(Path(layer).resolve(), folder) for layer in layers]
    text = json.dumps({"format": _FORMAT, "version": 1, "layers": names}, indent=1) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise VhdxError(f"cannot write the chain record: {exc.strerror or exc}", path=path, errno=exc.errno,
                        reason=Reason.HOST_IO) from None
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make a rename or unlink in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def role_of(path: str | os.PathLike[str], base: Path) -> tuple[list[Path] | None, int]:
    """(the recorded chain, the place of ``path`` in it: -1 when it is not listed)."""
    layers = read_layers(base)
    if layers is None:
        return None, -1
    target = Path(path).resolve()
    return layers, next((i for i, layer in enumerate(layers) if layer == target), -1)


def top_of(path: str | os.PathLike[str], base: Path) -> Path:
    """What a writable mount or serve of ``path`` opens: the recorded top when ``path`` is a frozen layer of
    the chain of ``base``; ``path`` itself otherwise."""
    layers, place = role_of(path, base)
    if layers is None or place < 0:
        return Path(path)
    top = layers[-1]
    if not top.exists():
        raise VhdxError(f"the chain record names {top} as the top of the chain, but it is not there",
                        path=record_path(base), reason=Reason.PARENT_NOT_FOUND)
    return top


def check_not_frozen(path: str | os.PathLike[str], base: Path) -> None:
    """Refuse a writable open of a frozen layer (one the chain record lists below its top)."""
    layers, place = role_of(path, base)
    if layers is not None and 0 <= place < len(layers) - 1:
        raise VhdxError(f"is a frozen layer of a chain whose top is {layers[-1].name} ({record_path(base).name}): "
                        "its checkpoints depend on it, so it is only read; write the top (a writable mount of any "
                        "layer opens it), or merge the checkpoints first", path=path, errno=errno.EACCES,
                        reason=Reason.FROZEN)


def _peek(path: str | os.PathLike[str], writable: bool) -> PosixFile:
    """A file opened to read its structures without taking its lock (a daemon may hold it exclusively)."""
    return PosixFile(path, writable=False, lock=False)


def base_of(path: str | os.PathLike[str]) -> Path:
    """The base of the chain ``path`` belongs to, found through the parent locators (nothing is locked); for a
    chain over a base in an object store, the lowest local layer (where its record lives)."""
    current = Path(path)
    for _ in range(MAX_CHAIN_DEPTH):
        image = VhdxFile.open(current, read_only=True, host_factory=_peek)
        try:
            if not image.is_differencing:
                return current
            parent = find_parent(image.path, image.metadata)
            if not isinstance(parent, Path):
                return current
            current = parent
        finally:
            image.close()
    raise VhdxError(f"parent chain is deeper than {MAX_CHAIN_DEPTH}", path=path, reason=Reason.PARENT_CHAIN)
