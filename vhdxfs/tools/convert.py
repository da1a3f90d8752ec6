"""`vhdxfs convert SRC DST`: raw <-> VHDX (and VHDX -> VHDX), chosen by the file extensions.

Zeros are never written: holes in a raw source are skipped with SEEK_DATA, unallocated VHDX ranges are
skipped by translation, and all-zero chunks of data are skipped too, so the output stays sparse.
"""

from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from ..engine import Disk, ImageSpec, Kind, create_image
from ..errors import HostIOError, Reason, UsageError, VhdxError
from ..sizes import format_size, parse_size
from .progress import progress

CHUNK = 4 << 20
VHDX_SUFFIXES = (".vhdx", ".avhdx")


def is_vhdx(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VHDX_SUFFIXES


class RawSource:
    """A raw file read in chunks, its holes skipped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise HostIOError(exc.strerror or str(exc), path=self.path, errno=exc.errno) from None
        self.size = os.fstat(self.fd).st_size

    def _next_data(self, pos: int) -> int:
        try:
            return os.lseek(self.fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return self.size
            return pos  # SEEK_DATA unsupported: treat everything as data

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        pos = 0
        while pos < self.size:
            pos = self._next_data(pos)
            if pos >= self.size:
                return
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = self.size
            end = min(hole, self.size)
            while pos < end:
                n = min(CHUNK, end - pos)
                data = os.pread(self.fd, n, pos)
                yield pos, data
                pos += n

    def close(self) -> None:
        os.close(self.fd)


class VhdxSource:
    """A VHDX disk (through its whole parent chain) read in chunks, only where some layer holds data."""

    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        self.size = disk.size
        self.path = disk.path

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        for extent in self.disk.extents():
            if extent.kind != Kind.DATA:
                continue  # zeros or a hole: nothing to write
            end = extent.offset + extent.length
            for pos in range(extent.offset, end, CHUNK):
                yield pos, bytes(self.disk.read(pos, min(CHUNK, end - pos)))

    def close(self) -> None:
        self.disk.close()


def convert(src: str, dst: str, disk_type: str = "dynamic", block_size: int | None = None,
            parent: str | None = None) -> int:
    """Copy the virtual contents of ``src`` into a new ``dst``; returns the bytes of data written."""
    if Path(dst).exists():
        raise VhdxError("already exists; remove it first or pick another name", path=dst, errno=errno.EEXIST,
                        reason=Reason.EXISTS)
    source = VhdxSource(Disk.open(src, read_only=True, parent=parent)) if is_vhdx(src) else RawSource(src)
    written = 0
    try:
        if is_vhdx(dst):
            if source.size == 0:
                raise UsageError("source is empty; a VHDX disk cannot have size 0", path=src)
            create_image(dst, ImageSpec(source.size, disk_type=disk_type, block_size=block_size))
            target = Disk.open(dst)
            write: Callable[[int, bytes], object] = target.write
        else:
            target = None
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            os.ftruncate(fd, source.size)

            def write(pos: int, data: bytes) -> None:
                os.pwrite(fd, data, pos)
        try:
            with progress(source.size, f"converting {Path(src).name}") as bar:
                done = 0
                for pos, data in source.chunks():
                    if data.count(0) != len(data):
                        write(pos, data)
                        written += len(data)
                    bar.update(pos + len(data) - done)
                    done = pos + len(data)
                bar.update(source.size - done)
        finally:
            if target is not None:
                target.close()
            else:
                os.fsync(fd)
                os.close(fd)
    except BaseException:
        Path(dst).unlink(missing_ok=True)
        raise
    finally:
        source.close()
    return written


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("convert", help="convert raw <-> VHDX",
                              description="Convert between raw and VHDX, by extension (.vhdx/.avhdx are VHDX, "
                                          "anything else is raw). The output is sparse; DST must not exist.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--type", choices=("dynamic", "fixed"), default="dynamic", help="type of a VHDX output")
    p.add_argument("--block-size", help="block size of a VHDX output (default by size, as QEMU)")
    p.add_argument("--parent", metavar="PATH", help="the parent of a differencing SRC, if it cannot be found")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    block_size = parse_size(args.block_size, "--block-size") if args.block_size else None
    written = convert(args.src, args.dst, args.type, block_size, args.parent)
    print(f"converted {args.src} -> {args.dst} ({format_size(written)} of data)")
    return 0
