"""Convert: a disk's contents into a new file, raw -> VHDX, VHDX -> raw, VHDX -> VHDX (a chain flattened),
raw -> raw (a sparse copy). The output reads exactly as the source (a differencing source: its whole chain).

The output is sparse, as qemu-img's: nothing is written where the source holds no data (holes of a raw
file, by SEEK_DATA; unallocated and ZERO blocks of a VHDX, and holes of its file), and pieces of
``sparse`` bytes (default 4 KiB, qemu-img's ``-S``) that hold only zeros are skipped too; ``sparse=0``
writes every byte the source holds as data. A new raw file and a new VHDX read as zeros where nothing is
written, so skipping writes nothing wrong. The copy itself is the mover's (mover.py): a reader thread,
large aligned buffers, zero detection by memcmp, early write-back.

Durable when it returns: the raw output is fsynced, the VHDX output closed (flushed, log applied). A failure
or an interrupt removes the output. Every error names the file it is about: the source's (or its parent's),
or the output's, also for an errno such as ENOSPC that the OS reports without a name.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import HostIOError, Reason, UsageError, VhdxError
from ...format.constants import MAX_VIRTUAL_SIZE, MiB
from ..disk.chain import open_chain
from ..disk.sync import Disk
from .create import ImageSpec, create_image
from .hostfile import fd_of, start_writeback
from .mover import CHUNK, move
from .progress import Progress, no_progress
from .sources import ChainSource, RawSource
from .zeroscan import DEFAULT_SPARSE

VHDX_SUFFIXES = (".vhdx", ".avhdx")
MAX_SPARSE = 16 * MiB  # qemu-img's -S stops just short of this too


@dataclass(frozen=True)
class ConvertResult:
    size: int  # the disk's virtual size
    written: int  # bytes of data written
    skipped: int  # bytes the source holds as data that were zero pieces, not written


def is_vhdx(path: str | os.PathLike[str]) -> bool:
    """VHDX by extension (.vhdx, .avhdx); anything else is raw."""
    return Path(path).suffix.lower() in VHDX_SUFFIXES


def _host_error(exc: OSError, path: Path) -> HostIOError:
    return HostIOError(exc.strerror or str(exc), path=path, errno=exc.errno)


class RawTarget:
    """A new raw file of the disk's size, sparse until written."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _host_error(exc, path) from None
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            self.abandon()
            raise _host_error(exc, path) from None

    def write(self, offset: int, view: memoryview) -> None:
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise _host_error(exc, self.path) from None

    def writeback(self) -> None:
        start_writeback(self.fd)

    def finish(self) -> None:
        fd, self.fd = self.fd, -1
        try:
            os.fsync(fd)
        except OSError as exc:
            raise _host_error(exc, self.path) from None
        finally:
            os.close(fd)

    def abandon(self) -> None:
        """Close without flushing (if still open), and remove the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


class VhdxTarget:
    """A new VHDX image (dynamic or fixed) of the disk's size, written through the engine's Disk."""

    def __init__(self, path: Path, spec: ImageSpec) -> None:
        self.path = path
        try:
            create_image(path, spec)
        except VhdxError as exc:
            raise exc.with_path(path) from None
        try:
            self.core = open_chain(path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self.disk = Disk(self.core)
        self.write = self.disk.write
        self.fd = fd_of(self.core.image.host)

    def writeback(self) -> None:
        start_writeback(self.fd)

    def finish(self) -> None:
        self.disk.close()  # flush: data, then the BAT through the log; the log applied

    def abandon(self) -> None:
        """Close without flushing (the output is dropped anyway), and remove the file."""
        self.core.close_files()
        self.path.unlink(missing_ok=True)


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, disk_type: str = "dynamic",
            block_size: int | None = None, parent: str | os.PathLike[str] | None = None,
            sparse: int = DEFAULT_SPARSE, progress: Progress = no_progress) -> ConvertResult:
    """Copy the contents of ``src`` into a new ``dst`` (which must not exist); raw or VHDX by extension.
    ``disk_type`` and ``block_size``: of a VHDX output; ``parent``: of a differencing source."""
    src, dst = Path(src), Path(dst)
    if not 0 <= sparse <= MAX_SPARSE or sparse % 512:
        raise UsageError(f"sparse size {sparse} must be 0 or a multiple of 512 up to 16 MiB", field="--sparse-size")
    if os.path.lexists(dst):
        raise VhdxError("already exists; remove it first or pick another name", path=dst, errno=errno.EEXIST,
                        reason=Reason.EXISTS)
    source = ChainSource(src, parent) if is_vhdx(src) else RawSource(src)
    try:
        size = source.size
        if is_vhdx(dst):
            if not 0 < size <= MAX_VIRTUAL_SIZE:
                raise UsageError(f"is {size} bytes; a VHDX disk holds from 1 byte to 64 TiB", path=src)
            target: RawTarget | VhdxTarget = VhdxTarget(dst, ImageSpec(size, disk_type=disk_type,
                                                                       block_size=block_size))
        else:
            target = RawTarget(dst, size)
        try:
            chunk = -(-max(sparse, 1) // CHUNK) * CHUNK  # a buffer holds whole sparse pieces
            with progress(size, f"converting {src.name}") as bar:
                moved = move(source.pieces(chunk), target.write, total=size, bar=bar, sparse=sparse,
                             chunk=chunk, writeback=target.writeback)
            target.finish()
        except BaseException:
            target.abandon()
            raise
    finally:
        source.close()
    return ConvertResult(size, moved.written, moved.skipped)
