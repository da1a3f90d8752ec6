"""Convert: a disk's contents into a new file, raw -> VHDX, VHDX -> raw, VHDX -> VHDX (a chain flattened),
raw -> raw (a sparse copy). The output reads exactly as the source (a differencing source: its whole chain).

The output is sparse, as qemu-img's: nothing is written where the source holds no data (holes of a raw
file, by SEEK_DATA; unallocated and ZERO blocks of a VHDX, and holes of its file), and pieces of
``sparse`` bytes (default 4 KiB, qemu-img's ``-S``) that hold only zeros are skipped too; ``sparse=0``
writes every byte the source holds as data. A new raw file and a new VHDX read as zeros where nothing is
written, so skipping writes nothing wrong. The copy itself is the mover's (mover.py): a reader thread,
large aligned buffers, zero detection by memcmp, early write-back.

Either side may be an object in an S3 store (``s3://BUCKET/KEY``). A remote source is read through the S3
host (sources.py): a download is as sparse as any output, its zero pieces skipped. A remote output is built
in a local temporary file (in ``TMPDIR``; it needs room for the output's data, a sparse file) and then sent
by a multipart upload, the temporary file removed either way; a raw output of a local raw source is the
source itself, sent as it is. Like a local one, an object already there is refused, and nothing is left in
the store by a failed upload (an upload that does not complete creates no object).

Durable when it returns: the raw output is fsynced, the VHDX output closed (flushed, log applied). A failure
or an interrupt removes the output. Every error names the file it is about: the source's (or its parent's),
or the output's, also for an errno such as ENOSPC that the OS reports without a name.
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ...errors import HostIOError, Reason, UsageError, VhdxError
from ...format.constants import MAX_VIRTUAL_SIZE, MiB
from ..disk.chain import open_chain
from ..disk.sync import Disk
from ..image.locations import Location, S3Location, parse
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


def is_vhdx(path: str | os.PathLike[str] | S3Location) -> bool:
    """VHDX by extension (.vhdx, .avhdx); anything else is raw."""
    return parse(path).suffix.lower() in VHDX_SUFFIXES


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


def convert(src: str | os.PathLike[str] | S3Location, dst: str | os.PathLike[str] | S3Location, *,
            disk_type: str = "dynamic", block_size: int | None = None,
            parent: str | os.PathLike[str] | S3Location | None = None, sparse: int = DEFAULT_SPARSE,
            progress: Progress = no_progress) -> ConvertResult:
    """Copy the contents of ``src`` into a new ``dst`` (which must not exist); raw or VHDX by extension,
    either a path or an ``s3://`` URL. ``disk_type`` and ``block_size``: of a VHDX output; ``parent``: of a
    differencing source."""
    source_at, target_at = parse(src), parse(dst)
    if not 0 <= sparse <= MAX_SPARSE or sparse % 512:
        raise UsageError(f"sparse size {sparse} must be 0 or a multiple of 512 up to 16 MiB", field="--sparse-size")
    if isinstance(target_at, S3Location):
        return _upload(source_at, target_at, disk_type=disk_type, block_size=block_size, parent=parent,
                       sparse=sparse, progress=progress)
    return _convert(source_at, target_at, disk_type=disk_type, block_size=block_size, parent=parent,
                    sparse=sparse, progress=progress)


def _convert(src: Location, dst: Path, *, disk_type: str, block_size: int | None,
             parent: str | os.PathLike[str] | S3Location | None, sparse: int, progress: Progress) -> ConvertResult:
    """The copy into a new local file."""
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


def _upload(src: Location, dst: S3Location, *, disk_type: str, block_size: int | None,
            parent: str | os.PathLike[str] | S3Location | None, sparse: int, progress: Progress) -> ConvertResult:
    """The copy into a new object: built in a temporary file, then sent by a multipart upload (S3 has no
    sparse objects and no writes into the middle of one, so the output is whole before a byte is sent)."""
    from ..image import s3client

    try:
        s3client.head(dst)
    except VhdxError as exc:
        if exc.errno != errno.ENOENT:
            raise
    except s3client.Transient as exc:
        raise HostIOError(str(exc), path=dst, errno=errno.EIO) from None
    else:
        raise VhdxError("already exists in the store; remove it first or pick another key", path=dst,
                        errno=errno.EEXIST, reason=Reason.EXISTS)
    if isinstance(src, Path) and not is_vhdx(src) and not is_vhdx(dst):
        size = _raw_size(src)
        s3client.put_file(dst, src)  # a raw copy of a raw file: the file itself
        return ConvertResult(size, size, 0)
    with tempfile.TemporaryDirectory(prefix="vhdxfs-upload-") as folder:
        built = Path(folder) / dst.name
        result = _convert(src, built, disk_type=disk_type, block_size=block_size, parent=parent, sparse=sparse,
                          progress=progress)
        s3client.put_file(dst, built)
    return result


def _raw_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise _host_error(exc, path) from None
