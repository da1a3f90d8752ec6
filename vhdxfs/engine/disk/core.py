"""DiskCore: the virtual disk of one image and its parents, as steps (steps.py) that both drivers run.

This is the one implementation of reading, writing, discarding, write-zeroes, extents, flush and close.
Its parts: Translator (translate.py: virtual range -> typed runs), Allocation (allocation.py: blocks
and sector bitmaps), Committer (committer.py: flush and the log), HeaderState (headers.py). Front ends
never use it directly: they use Disk (disk.py, synchronous) or AsyncDisk (aio/disk.py, trio).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from ...errors import OutOfRangeError, ParentError, ReadOnlyError, VhdxError
from ...format.bat import PayloadState
from ..image import parents
from ..image.host import HostFactory, PosixFile
from ..image.journal import LogWriter
from ..image.loader import VhdxFile
from .allocate import Allocation
from .flush import Committer
from .steps import Step, StepIO
from .translate import Extent, Kind, Translator, blocks, new_bitmaps

# Plain ints: compared on every request, where an IntEnum comparison costs a method call.
_PRESENT = int(PayloadState.FULLY_PRESENT)
_PARTIAL = int(PayloadState.PARTIALLY_PRESENT)
_NOT_PRESENT = int(PayloadState.NOT_PRESENT)


class DiskCore:
    """One layer of a chain: an image file, its translation, allocation and commit; ``parent`` below it."""

    def __init__(self, image: VhdxFile, parent: DiskCore | None) -> None:
        self.image = image
        self.parent = parent
        self.path: Path = image.path
        self.geometry = g = image.geometry
        self.size = g.virtual_size
        self.block_size = g.block_size
        self.read_only = image.read_only
        self.fixed = image.metadata.leave_block_allocated
        self.bat = image.bat
        bitmaps = new_bitmaps(g, image.read_meta) if image.is_differencing else None
        self.translator = Translator(image.bat, bitmaps, has_parent=parent is not None)
        self.allocation = Allocation(self.translator, image.host.size(), has_parent=parent is not None)
        self.committer = Committer(image.headers, LogWriter(image.host, image.headers), self.allocation)
        self.io: StepIO

    # -- opening ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, read_only: bool = False, parent: str | os.PathLike | None = None,
             host_factory: HostFactory = PosixFile, data_write_guid: uuid.UUID | None = None,
             _chain: tuple[str, ...] = ()) -> DiskCore:
        """Open an image (blocking); a differencing image opens its parent chain (read-only, shared locks)."""
        image = VhdxFile.open(path, read_only=read_only, host_factory=host_factory, data_write_guid=data_write_guid)
        if not image.is_differencing:
            return cls(image, None)
        try:
            chain = (*_chain, os.path.realpath(path))
            if len(chain) > parents.MAX_CHAIN_DEPTH:
                raise ParentError(f"parent chain is deeper than {parents.MAX_CHAIN_DEPTH}", path=chain[0])
            parent_path = parents.find_parent(image.path, image.metadata, parent)
            if os.path.realpath(parent_path) in chain:
                raise ParentError(f"parent chain loops back to {parent_path}", path=path)
            below = cls.open(parent_path, read_only=True, host_factory=host_factory, _chain=chain)
            try:
                parents.check_parent(image.path, image.metadata, parent_path, below.image.metadata,
                                     below.image.header.data_write_guid)
            except VhdxError:
                below.close_files()
                raise
        except BaseException:
            image.close()
            raise
        return cls(image, below)

    def layers(self) -> list[DiskCore]:
        """This layer and the ones below it, child first."""
        out, layer = [], self
        while layer is not None:
            out.append(layer)
            layer = layer.parent
        return out

    def attach(self, make_io) -> None:
        """Bind every layer to the StepIO that ``make_io(host)`` gives (synchronous or async driver)."""
        for layer in self.layers():
            io = make_io(layer.image.host)
            layer.io = layer.translator.io = io
            layer.allocation.attach(io)
            layer.committer.attach(io)

    def close_files(self) -> None:
        """Close every layer's host file without flushing (for failed opens)."""
        for layer in self.layers():
            layer.image.close()

    # -- reads --------------------------------------------------------------------------------------------
    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(f"request {offset}+{length} lies outside the disk ({self.size} bytes)",
                                  path=self.path)

    def locate(self, offset: int, length: int) -> int:
        """The file offset of [offset, offset+length) when this layer holds all of it in one present block
        (most requests: one BAT lookup, one host read, no translation), else -1. Drivers use it to skip
        the step machinery on that path; ``read`` uses it first too."""
        if offset < 0 or length < 0 or offset + length > self.size:
            self.check_range(offset, length)
        block, within = divmod(offset, self.block_size)
        if within + length <= self.block_size and self.image.overlay is None:
            state, file_offset = self.bat.payload(block)
            if state == _PRESENT:
                return file_offset + within
        return -1

    def write_target(self, offset: int, length: int) -> int:
        """The file offset a write of [offset, offset+length) goes to when it needs nothing but the payload
        write itself (writable, DataWriteGuid already new, no parent, one present block), else -1."""
        if self.read_only or self.parent is not None or not self.image.headers.data_writes_begun:
            return -1
        return self.locate(offset, length)

    def read(self, offset: int, length: int) -> Step:
        """The bytes of [offset, offset+length) (a bytes-like object)."""
        committer = self.committer
        committer.in_flight += 1  # the space read stays ours until the read is done (committer.py)
        try:
            return (yield from self._read(offset, length))
        finally:
            committer.in_flight -= 1

    def _read(self, offset: int, length: int) -> Step:
        where = self.locate(offset, length)
        if where >= 0:
            buf = bytearray(length)
            yield (self.io.pread_into, where, memoryview(buf))
            return buf
        overlay = self.image.overlay
        runs = yield from self.translator.translate(offset, length)
        if len(runs) == 1 and runs[0].kind in (Kind.ZERO, Kind.HOLE):
            return bytes(length)
        buf = bytearray(length)
        view = memoryview(buf)
        for voff, n, kind, where in runs:
            part = view[voff - offset:voff - offset + n]
            if kind == Kind.PARENT:
                part[:] = yield from self.parent.read(voff, n)
            elif kind == Kind.DATA:
                yield (self.io.pread_into, where, part)
                if overlay:
                    patched = bytearray(part)
                    overlay.patch(where, patched)
                    part[:] = patched
        return buf

    def extents(self, offset: int, length: int, depth: int = 0) -> Step:
        """Extents of [offset, offset+length) through the whole chain, coalesced."""
        self.check_range(offset, length)
        out: list[Extent] = []
        for run in (yield from self.translator.translate(offset, length)):
            if run.kind == Kind.PARENT:
                below = yield from self.parent.extents(run.offset, run.length, depth + 1)
                for extent in below:
                    _add_extent(out, extent)
            else:
                _add_extent(out, Extent(run.offset, run.length, run.kind, self.path, depth, run.file_offset))
        return out

    # -- writes -------------------------------------------------------------------------------------------
    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("image is open read-only", path=self.path)

    def _begin_data_writes(self) -> Step:
        """2.2.2.1: a new DataWriteGuid before the first change a reader of the disk could observe."""
        headers = self.image.headers
        if not headers.data_writes_begun:
            yield (self.io.call, headers.begin_data_writes)

    def _align_to_sectors(self, offset: int, view: memoryview) -> Step:
        """Widen a write to whole sectors with the current contents (a sector bitmap has no finer grain)."""
        lss = self.geometry.logical_sector_size
        start, end = offset // lss * lss, -(-(offset + len(view)) // lss) * lss
        if start == offset and end == offset + len(view):
            return offset, view
        buf = bytearray(end - start)
        buf[:lss] = yield from self.read(start, lss)
        if end - lss > start:
            buf[-lss:] = yield from self.read(end - lss, lss)
        buf[offset - start:offset - start + len(view)] = view
        return start, memoryview(buf)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> Step:
        self._writable()
        view = memoryview(data).cast("B")
        self.check_range(offset, len(view))
        if not view:
            return
        if not self.image.headers.data_writes_begun:
            yield from self._begin_data_writes()
        if self.parent is not None:
            offset, view = yield from self._align_to_sectors(offset, view)
        committer = self.committer
        committer.in_flight += 1
        try:
            where = self.locate(offset, len(view))
            if where >= 0:  # the common case: into one present block
                yield (self.io.pwrite, where, view)
                return
            pending: list[tuple[int, int, int]] = []  # (file offset, start in view, length), coalesced
            partial: list[tuple[int, int, int]] = []  # (block, virtual offset, length) to mark present after
            for block, within, pos, n in blocks(offset, len(view), self.block_size):
                state, file_offset = self.bat.payload(block)
                if state != _PRESENT:
                    state, file_offset = yield from self.allocation.allocate(block)
                    if state == _PARTIAL:
                        partial.append((block, pos, n))
                where = file_offset + within
                if pending and pending[-1][0] + pending[-1][2] == where:
                    pending[-1] = (pending[-1][0], pending[-1][1], pending[-1][2] + n)
                else:
                    pending.append((where, pos - offset, n))
            for where, start, n in pending:
                yield (self.io.pwrite, where, view[start:start + n])
            # Only now, with the data in the file, may the sector bitmap say these sectors are here.
            for block, voff, n in partial:
                self.allocation.mark_present(block, voff, n)
        finally:
            committer.in_flight -= 1

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> Step:
        """The range reads as zeros afterwards (never as the parent). With ``unmap``, whole blocks give their
        space back (they become ZERO); without, allocated blocks stay allocated and hold zeros."""
        self._writable()
        self.check_range(offset, length)
        if not length:
            return
        yield from self._begin_data_writes()
        bs, has_parent = self.block_size, self.parent is not None
        for block, within, pos, n in blocks(offset, length, bs):
            whole = within == 0 and n == min(bs, self.size - block * bs)
            state, file_offset = self.bat.payload(block)
            if unmap and whole and not self.fixed and (has_parent or state in (_PRESENT, _PARTIAL)):
                yield from self.allocation.unmap(block)
            elif state == _PRESENT:
                yield (self.io.write_zeros, file_offset + within, n)
            elif has_parent and state in (_PARTIAL, _NOT_PRESENT):  # the parent shows through: cover it
                yield from self.write(pos, bytes(n))

    # -- durability ---------------------------------------------------------------------------------------
    def flush(self) -> Step:
        if not self.read_only:
            yield from self.committer.flush()

    def close(self) -> Step:
        """Flush, apply the log, clear LogGuid (a clean image), close the files of every layer."""
        try:
            if not self.read_only:
                yield from self.committer.flush()
                yield from self.committer.finish()
        finally:
            yield (self.io.close,)
            if self.parent is not None:
                yield from self.parent.close()


def _add_extent(out: list[Extent], extent: Extent) -> None:
    if out:
        last = out[-1]
        if last.kind == extent.kind and last.layer == extent.layer and last.depth == extent.depth and (
                extent.kind != Kind.DATA or last.file_offset + last.length == extent.file_offset):
            out[-1] = last._replace(length=last.length + extent.length)
            return
    out.append(extent)

