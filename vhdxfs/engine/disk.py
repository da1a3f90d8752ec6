"""VirtualDisk: the virtual disk of one VHDX file (and its parents), read and written at byte offsets.

Translation of a request into runs happens on the trio thread without waiting; payload bytes then move
through HostFile (page-cache reads inline, writes queued for its writer thread) with no lock held. A lock
serialises allocation (BAT changes) and another serialises commits, which journal the dirty BAT pages in
one log entry per flush (group commit).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import trio

from ..errors import OutOfRangeError, ParentError, ReadOnlyError, VhdxError
from ..format import guids
from ..format.bat import BitmapState, PayloadState
from ..format.constants import SECTOR_BITMAP_BLOCK_SIZE
from . import parent as parents
from .allocator import Allocator
from .bitmap import SectorBitmaps, all_set, bit_runs
from .hostfile import HostFile
from .image import HostFactory, VhdxFile
from .journal import LogWriter

ZERO = -1  # a run that reads as zeros
PARENT = -2  # a run that reads from the parent (differencing images)
_PRESENT = PayloadState.FULLY_PRESENT
_PARTIAL = PayloadState.PARTIALLY_PRESENT


class VirtualDisk:
    """Async access to one image; create with ``await VirtualDisk.open(path)``."""

    def __init__(self, image: VhdxFile) -> None:
        self.image = image
        self.host = image.host
        self.bat = image.bat
        self.geometry = image.geometry
        self.read_only = image.read_only
        self.fixed = image.metadata.leave_block_allocated
        self.allocator = Allocator(self.host.size())
        self.writer = LogWriter(self.host, image.header.log_offset, image.header.log_length)
        self._alloc_lock = trio.Lock()
        self._commit_lock = trio.Lock()
        self._guid_lock = trio.Lock()
        self._data_guid_changed = False
        self._inflight_writes = 0
        self._closed = False
        self.parent: VirtualDisk | None = None
        self.bitmaps = SectorBitmaps(self.geometry, lambda off: image.read_meta(off, SECTOR_BITMAP_BLOCK_SIZE)) \
            if image.is_differencing else None

    @classmethod
    async def open(cls, path: str | Path, *, read_only: bool = False, parent: str | Path | None = None,
                   host_factory: HostFactory = HostFile, _chain: tuple[str, ...] = ()) -> VirtualDisk:
        """Open an image; a differencing image opens its parent chain too (parents read-only, shared locks)."""
        image = await trio.to_thread.run_sync(
            functools.partial(VhdxFile.open, path, read_only=read_only, host_factory=host_factory))
        disk = cls(image)
        if not image.is_differencing:
            return disk
        try:
            chain = (*_chain, os.path.realpath(path))
            if len(chain) > parents.MAX_CHAIN_DEPTH:
                raise ParentError(f"parent chain is deeper than {parents.MAX_CHAIN_DEPTH}", path=chain[0])
            parent_path = await trio.to_thread.run_sync(parents.find_parent, image.path, image.metadata, parent)
            if os.path.realpath(parent_path) in chain:
                raise ParentError(f"parent chain loops back to {parent_path}", path=path)
            disk.parent = await VirtualDisk.open(parent_path, read_only=True, host_factory=host_factory,
                                                 _chain=chain)
            try:
                parents.check_parent(image.path, image.metadata, parent_path, disk.parent.image.metadata,
                                     disk.parent.image.header.data_write_guid)
            except VhdxError:
                await disk.parent.close()
                raise
        except BaseException:
            image.close()
            raise
        return disk

    def chain(self) -> list[Path]:
        """This image and its parents, child first."""
        out, disk = [], self
        while disk is not None:
            out.append(disk.path)
            disk = disk.parent
        return out

    # -- properties ---------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.image.path

    @property
    def size(self) -> int:
        return self.geometry.virtual_size

    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    @property
    def logical_sector_size(self) -> int:
        return self.geometry.logical_sector_size

    @property
    def physical_sector_size(self) -> int:
        return self.image.metadata.physical_sector_size

    # -- translation --------------------------------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(f"request {offset}+{length} lies outside the disk ({self.size} bytes)",
                                  path=self.path)

    async def translate(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """Runs (virtual offset, length, file offset | ZERO | PARENT) covering the request, coalesced."""
        bs = self.block_size
        runs: list[tuple[int, int, int]] = []
        end = offset + length
        while offset < end:
            block, within = divmod(offset, bs)
            n = min(bs - within, end - offset)
            state, file_offset = self.bat.payload(block)
            if state == _PRESENT:
                self._add_run(runs, offset, n, file_offset + within)
            elif state == _PARTIAL:
                for voff, m, present in await self._sector_runs(block, offset, n):
                    self._add_run(runs, voff, m, file_offset + voff - block * bs if present else PARENT)
            elif state == PayloadState.NOT_PRESENT and self.parent is not None:
                self._add_run(runs, offset, n, PARENT)
            else:
                self._add_run(runs, offset, n, ZERO)
            offset += n
        return runs

    @staticmethod
    def _add_run(runs: list[tuple[int, int, int]], voff: int, n: int, where: int) -> None:
        if runs:
            pv, pn, pw = runs[-1]
            if (pw == where and where < 0) or (pw >= 0 and where == pw + pn):
                runs[-1] = (pv, pn + n, pw)
                return
        runs.append((voff, n, where))

    async def _bitmap(self, chunk: int) -> bytearray:
        bits = self.bitmaps.blocks.get(chunk)
        if bits is None:
            state, file_offset = self.bat.bitmap(chunk)
            bits = await trio.to_thread.run_sync(self.bitmaps.load, chunk, state, file_offset)
        return bits

    async def _sector_runs(self, block: int, offset: int, n: int) -> list[tuple[int, int, bool]]:
        """(virtual offset, length, present here) for [offset, offset+n) inside a PARTIALLY_PRESENT block."""
        lss = self.logical_sector_size
        first_sector, last_sector = offset // lss, (offset + n - 1) // lss
        chunk, bit = self.bitmaps.sector_position(first_sector)
        bits = await self._bitmap(chunk)
        out = []
        for start, count, present in bit_runs(bits, bit, last_sector - first_sector + 1):
            lo = max(offset, (first_sector + start - bit) * lss)
            hi = min(offset + n, (first_sector + start - bit + count) * lss)
            out.append((lo, hi - lo, present))
        return out

    # -- reads --------------------------------------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """The bytes of [offset, offset+length) (a bytes-like object)."""
        self._check(offset, length)
        block, within = divmod(offset, self.block_size)
        if within + length <= self.block_size and self.image.overlay is None:
            # Most requests: inside one block, which is simply present. One BAT lookup, one host read.
            state, file_offset = self.bat.payload(block)
            if state == _PRESENT:
                buf = bytearray(length)
                await self.host.apread_into(file_offset + within, memoryview(buf))
                return buf
        runs = await self.translate(offset, length)
        if len(runs) == 1 and runs[0][2] == ZERO:
            return bytes(length)
        buf = bytearray(length)
        view = memoryview(buf)
        for voff, n, where in runs:
            if where == PARENT:
                view[voff - offset:voff - offset + n] = await self.parent.read(voff, n)
            elif where != ZERO:
                await self.host.apread_into(where, view[voff - offset:voff - offset + n])
                if self.image.overlay:
                    patched = bytearray(view[voff - offset:voff - offset + n])
                    self.image.overlay.patch(where, patched)
                    view[voff - offset:voff - offset + n] = patched
        return buf

    # -- writes -------------------------------------------------------------------------------------------
    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("image is open read-only", path=self.path)

    async def _before_guest_write(self) -> None:
        """2.2.2.1: a new DataWriteGuid before the first change a reader of the disk could observe."""
        if self._data_guid_changed:
            return
        async with self._guid_lock:
            if not self._data_guid_changed:
                await trio.to_thread.run_sync(functools.partial(self.image.update_header,
                                                                data_write_guid=guids.new_guid()))
                self._data_guid_changed = True

    async def _new_space(self, length: int) -> int:
        """File offset of ``length`` fresh bytes (reading as zeros). Call with the allocation lock held."""
        file_offset, extends = self.allocator.allocate(length)
        if extends:
            await self.host.atruncate(self.allocator.file_end)
        return file_offset

    async def _allocate(self, block: int) -> tuple[int, int]:
        """(state, file offset) of ``block`` ready for writing, allocating space if it has none.

        In a differencing image a NOT_PRESENT block becomes PARTIALLY_PRESENT (the sector bitmap says which
        sectors are here, the rest still come from the parent); any other block becomes FULLY_PRESENT on
        fresh space, which reads as zeros, as the block did before.
        """
        async with self._alloc_lock:
            state, file_offset = self.bat.payload(block)
            if state == _PARTIAL:
                await self._bitmap(block // self.geometry.chunk_ratio)  # the write will mark sectors in it
            if state in (_PRESENT, _PARTIAL):
                return state, file_offset
            new_state = _PARTIAL if self.parent is not None and state == PayloadState.NOT_PRESENT else _PRESENT
            if new_state == _PARTIAL:
                chunk = block // self.geometry.chunk_ratio
                await self._bitmap(chunk)
                if self.bat.bitmap(chunk)[0] != BitmapState.PRESENT:
                    bitmap_offset = await self._new_space(SECTOR_BITMAP_BLOCK_SIZE)
                    self.bat.set_bitmap(chunk, BitmapState.PRESENT, bitmap_offset)
                    self.bitmaps.place(chunk, bitmap_offset)
            file_offset = await self._new_space(self.block_size)
            self.bat.set_payload(block, new_state, file_offset)
            return new_state, file_offset

    async def _align_to_sectors(self, offset: int, view: memoryview) -> tuple[int, memoryview]:
        """Widen a write to whole sectors with the current contents (a sector bitmap has no finer grain)."""
        lss = self.logical_sector_size
        start, end = offset // lss * lss, -(-(offset + len(view)) // lss) * lss
        if start == offset and end == offset + len(view):
            return offset, view
        buf = bytearray(end - start)
        buf[:lss] = await self.read(start, lss)
        if end - lss > start:
            buf[-lss:] = await self.read(end - lss, lss)
        buf[offset - start:offset - start + len(view)] = view
        return start, memoryview(buf)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._writable()
        view = memoryview(data).cast("B")
        self._check(offset, len(view))
        if not view:
            return
        await self._before_guest_write()
        if self.parent is not None:
            offset, view = await self._align_to_sectors(offset, view)
        self._inflight_writes += 1
        try:
            bs = self.block_size
            pos, end = offset, offset + len(view)
            pending: list[tuple[int, int, int]] = []  # (file offset, start in view, length), coalesced
            partial: list[tuple[int, int, int]] = []  # (block, virtual offset, length) to mark present after
            while pos < end:
                block, within = divmod(pos, bs)
                n = min(bs - within, end - pos)
                state, file_offset = self.bat.payload(block)
                if state != _PRESENT:
                    state, file_offset = await self._allocate(block)
                    if state == _PARTIAL:
                        partial.append((block, pos, n))
                where = file_offset + within
                if pending and pending[-1][0] + pending[-1][2] == where:
                    pending[-1] = (pending[-1][0], pending[-1][1], pending[-1][2] + n)
                else:
                    pending.append((where, pos - offset, n))
                pos += n
            for where, start, n in pending:
                await self.host.apwrite(where, view[start:start + n])
            # Only now, with the data in the file, may the sector bitmap say these sectors are here.
            for block, voff, n in partial:
                self._mark_present(block, voff, n)
        finally:
            self._inflight_writes -= 1

    def _mark_present(self, block: int, voff: int, n: int) -> None:
        lss = self.logical_sector_size
        chunk, bit = self.bitmaps.sector_position(voff // lss)
        self.bitmaps.mark(chunk, bit, n // lss)
        state, file_offset = self.bat.payload(block)
        if state == _PARTIAL:
            _chunk, first = self.bitmaps.sector_position(block * self.geometry.sectors_per_block)
            if all_set(self.bitmaps.blocks[chunk], first, self.geometry.sectors_per_block):
                self.bat.set_payload(block, _PRESENT, file_offset)

    async def discard(self, offset: int, length: int) -> None:
        """The range reads as zeros afterwards (never as the parent); whole blocks give their space back."""
        self._writable()
        self._check(offset, length)
        if not length:
            return
        await self._before_guest_write()
        bs = self.block_size
        pos, end = offset, offset + length
        while pos < end:
            block, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            whole = within == 0 and n == min(bs, self.size - block * bs)
            state, file_offset = self.bat.payload(block)
            if whole and not self.fixed and (self.parent is not None or state in (_PRESENT, _PARTIAL)):
                async with self._alloc_lock:
                    state, file_offset = self.bat.payload(block)
                    self.bat.set_payload(block, PayloadState.ZERO)
                    if state in (_PRESENT, _PARTIAL):
                        await self.host.apunch_hole(file_offset, bs)
                        self.allocator.release(file_offset, bs)
            elif state == _PRESENT:
                await self.host.awrite_zeros(file_offset + within, n)
            elif self.parent is not None and state in (_PARTIAL, PayloadState.NOT_PRESENT):
                await self.write(pos, bytes(n))
            pos += n

    # -- durability ---------------------------------------------------------------------------------------
    async def flush(self) -> None:
        """Every write acknowledged so far is durable once this returns: data first, then the BAT, via the log."""
        if self.read_only:
            return
        async with self._commit_lock:
            # Pages first, data second: a page taken now describes only writes already queued, and the
            # fdatasync below makes all of those durable before the log can refer to them. A write that
            # marks its sectors later waits for the next flush.
            bat_dirty = set(self.bat.dirty)
            bitmap_dirty = set(self.bitmaps.dirty) if self.bitmaps is not None else set()
            pages = self.bat.take_dirty_pages()
            if self.bitmaps is not None:
                pages.update(self.bitmaps.take_dirty_pages())
            file_end = self.allocator.file_end
            try:
                await self.host.afdatasync()
                if not pages:
                    return
                if self.writer.log_guid is None:
                    guid = guids.new_guid()
                    await trio.to_thread.run_sync(functools.partial(self.image.update_header, log_guid=guid))
                    self.writer.log_guid = guid
                await trio.to_thread.run_sync(self.writer.commit, pages, file_end)
            except BaseException:
                # Not durable (e.g. ENOSPC): the pages stay dirty so the next flush tries again.
                self.bat.dirty |= bat_dirty
                if self.bitmaps is not None:
                    self.bitmaps.dirty |= bitmap_dirty
                raise
            if self._inflight_writes == 0:
                self.allocator.release_pending()

    async def close(self) -> None:
        """Flush, apply the log, clear LogGuid (a clean image), release the lock."""
        if self._closed:
            return
        try:
            if not self.read_only:
                await self.flush()
                async with self._commit_lock:
                    if self.writer.log_guid is not None:
                        await self.host.afdatasync()
                        await trio.to_thread.run_sync(functools.partial(self.image.update_header,
                                                                        log_guid=guids.NULL_GUID))
                        self.writer.log_guid = None
        finally:
            self._closed = True
            self.image.close()
            if self.parent is not None:
                await self.parent.close()

    async def __aenter__(self) -> VirtualDisk:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def data_runs(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(virtual offset, length) of the ranges that may hold non-zero data, through the whole chain."""
        out: list[tuple[int, int]] = []
        for voff, n, where in await self.translate(offset, length):
            if where == PARENT:
                out.extend(await self.parent.data_runs(voff, n))
            elif where != ZERO:
                out.append((voff, n))
        return out
