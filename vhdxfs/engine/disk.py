"""VirtualDisk: the virtual disk of one VHDX file (and its parents), read and written at byte offsets.

Translation of a request into runs happens on the trio thread without waiting; payload bytes then move
in worker threads with no lock held. A lock serialises allocation (BAT changes) and another serialises
commits, which journal the dirty BAT pages in one log entry per flush (group commit).
"""

from __future__ import annotations

import functools
from pathlib import Path

import trio

from ..errors import OutOfRangeError, ReadOnlyError, UnsupportedError
from ..format import guids
from ..format.bat import PayloadState
from .allocator import Allocator
from .hostfile import HostFile
from .image import HostFactory, VhdxFile
from .journal import LogWriter

ZERO = -1  # a run that reads as zeros
PARENT = -2  # a run that reads from the parent (differencing images)
_PRESENT = PayloadState.FULLY_PRESENT


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

    @classmethod
    async def open(cls, path: str | Path, *, read_only: bool = False, parent: str | Path | None = None,
                   host_factory: HostFactory = HostFile) -> VirtualDisk:
        image = await trio.to_thread.run_sync(
            functools.partial(VhdxFile.open, path, read_only=read_only, host_factory=host_factory))
        if image.is_differencing:
            image.close()
            raise UnsupportedError("differencing images are not supported yet", path=path)
        return cls(image)

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

    def translate(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """Runs (virtual offset, length, file offset | ZERO | PARENT) covering the request, coalesced."""
        bs = self.block_size
        runs: list[tuple[int, int, int]] = []
        end = offset + length
        while offset < end:
            block, within = divmod(offset, bs)
            n = min(bs - within, end - offset)
            state, file_offset = self.bat.payload(block)
            where = file_offset + within if state == _PRESENT else ZERO
            if runs:
                pv, pn, pw = runs[-1]
                if (pw == where == ZERO) or (pw >= 0 and where == pw + pn):
                    runs[-1] = (pv, pn + n, pw)
                    offset += n
                    continue
            runs.append((offset, n, where))
            offset += n
        return runs

    # -- reads --------------------------------------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        runs = self.translate(offset, length)
        if len(runs) == 1:
            return await self._read_run(*runs[0])
        buf = bytearray(length)
        for voff, n, where in runs:
            if where != ZERO:
                buf[voff - offset:voff - offset + n] = await self._read_run(voff, n, where)
        return bytes(buf)

    async def _read_run(self, voff: int, n: int, where: int) -> bytes:
        if where == ZERO:
            return bytes(n)
        data = await self.host.apread(where, n)
        if self.image.overlay:
            buf = bytearray(data)
            self.image.overlay.patch(where, buf)
            data = bytes(buf)
        return data

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

    async def _allocate(self, block: int) -> int:
        """File offset of ``block``, allocating it (fresh space reads as zeros) if it has none."""
        async with self._alloc_lock:
            state, file_offset = self.bat.payload(block)
            if state == _PRESENT:
                return file_offset
            file_offset, extends = self.allocator.allocate(self.block_size)
            if extends:
                await self.host.atruncate(self.allocator.file_end)
            self.bat.set_payload(block, _PRESENT, file_offset)
            return file_offset

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._writable()
        view = memoryview(data).cast("B")
        self._check(offset, len(view))
        if not view:
            return
        await self._before_guest_write()
        self._inflight_writes += 1
        try:
            bs = self.block_size
            pos, end = offset, offset + len(view)
            pending: list[tuple[int, int, int]] = []  # (file offset, start in view, length), coalesced
            while pos < end:
                block, within = divmod(pos, bs)
                n = min(bs - within, end - pos)
                state, file_offset = self.bat.payload(block)
                if state != _PRESENT:
                    file_offset = await self._allocate(block)
                where = file_offset + within
                if pending and pending[-1][0] + pending[-1][2] == where:
                    pending[-1] = (pending[-1][0], pending[-1][1], pending[-1][2] + n)
                else:
                    pending.append((where, pos - offset, n))
                pos += n
            for where, start, n in pending:
                await self.host.apwrite(where, view[start:start + n])
        finally:
            self._inflight_writes -= 1

    async def discard(self, offset: int, length: int) -> None:
        """The range reads as zeros afterwards; whole blocks give their space back to the host."""
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
            block_len = min(bs, self.size - block * bs)
            state, file_offset = self.bat.payload(block)
            if state == _PRESENT:
                if within == 0 and n == block_len and not self.fixed:
                    async with self._alloc_lock:
                        state, file_offset = self.bat.payload(block)
                        if state == _PRESENT:
                            self.bat.set_payload(block, PayloadState.ZERO)
                            await self.host.apunch_hole(file_offset, bs)
                            self.allocator.release(file_offset, bs)
                else:
                    await self.host.awrite_zeros(file_offset + within, n)
            pos += n

    # -- durability ---------------------------------------------------------------------------------------
    async def flush(self) -> None:
        """Every write acknowledged so far is durable once this returns: data first, then the BAT, via the log."""
        if self.read_only:
            return
        async with self._commit_lock:
            await self.host.afdatasync()
            if not self.bat.dirty:
                return
            if self.writer.log_guid is None:
                guid = guids.new_guid()
                await trio.to_thread.run_sync(functools.partial(self.image.update_header, log_guid=guid))
                self.writer.log_guid = guid
            pages = self.bat.take_dirty_pages()
            try:
                await trio.to_thread.run_sync(self.writer.commit, pages, self.allocator.file_end)
            except BaseException:
                self.bat.dirty.update((off - self.bat.region_offset) // len(p) for off, p in pages.items())
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

    async def __aenter__(self) -> VirtualDisk:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def allocated_bytes(self) -> int:
        return sum(length for _off, length, _i in self.bat.allocated_ranges())
