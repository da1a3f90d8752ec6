"""The block cache of a remote image: pages of the object, in memory and optionally on local disk.

The unit is a 4 KiB page (``PAGE``), so a random 4 KiB read fetches 4 KiB, not a larger unit it will mostly
never use; sequential reads are fetched ahead in large runs (remote.py). Memory holds up to ``memory_bytes``
of pages, least recently used first out. With a cache directory, pages also go into a sparse file per object
(named by the object's URL and ETag, so a replaced object never meets the old one's pages) at their own
offsets, and a later open finds them through SEEK_DATA; up to ``disk_bytes`` are kept there, the least
recently used given back by punching their holes. A page is written whole before it counts as there.

Thread-safe: one lock around the maps, held for lookups, copies and a page's eviction (never across a
fetch or a read of the cache file), so ``copy(nowait=True)`` may run on an event loop's thread. A page read
from the cache file with the lock let go counts only if it was not evicted (its hole punched) or written
again meanwhile: each page on disk carries the number of its write, checked again once the read is done.
The cache file's descriptor is closed only once no read or write of it is under way (``_using``), so a
number the OS hands out again is never read or written as the cache.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict

PAGE = 4096
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


class BlockCache:
    def __init__(self, size: int, *, memory_bytes: int = 256 << 20, directory: str | None = None,
                 disk_bytes: int = 4 << 30, identity: str = "") -> None:
        self.size = size
        self.pages = (size + PAGE - 1) // PAGE
        self.memory_limit = max(memory_bytes // PAGE, 256)
        self.memory: OrderedDict[int, bytes] = OrderedDict()
        self.lock = threading.Lock()
        self.fd = -1
        self.disk: OrderedDict[int, int] = OrderedDict()  # page -> the number of its write (see _disk_get)
        self.writes = 0
        self.users = 0  # reads and writes of the cache file under way without the lock
        self.closing = -1  # the descriptor close() let go of while it was in use
        self.disk_limit = max(disk_bytes // PAGE, 256)
        if directory:
            self._open_disk(directory, identity)

    # -- the on-disk part ---------------------------------------------------------------------------------
    def _open_disk(self, directory: str, identity: str) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        name = hashlib.sha256(identity.encode()).hexdigest()[:40]
        self.fd = os.open(os.path.join(directory, f"{name}.pages"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        pos = 0
        try:
            while pos < self.pages * PAGE:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
                end = os.lseek(self.fd, start, os.SEEK_HOLE)
                for page in range((start + PAGE - 1) // PAGE, end // PAGE):
                    self.disk[page] = 0
                pos = end
        except OSError:
            pass  # ENXIO: no data past pos

    def _disk_put(self, page: int, data: bytes) -> None:
        """Write a page into the cache file, then count it as there; evict the least recently used past the
        bound. The hole is punched under the lock, so a page written again later is never punched by an
        eviction that ran late."""
        with self.lock:
            if self.fd < 0 or page in self.disk:
                return
            fd = self._use()
        try:
            os.pwrite(fd, data.ljust(PAGE, b"\0"), page * PAGE)
        except OSError:
            return  # a full or failing cache disk only costs fetches
        finally:
            with self.lock:
                self._done()
        with self.lock:
            if self.fd != fd:
                return  # closed meanwhile
            self.writes += 1
            self.disk[page] = self.writes
            while len(self.disk) > self.disk_limit:
                old, _ = self.disk.popitem(last=False)
                self._punch(old)

    def _use(self) -> int:
        """The cache file's descriptor, kept open until ``_done`` (called with the lock held)."""
        self.users += 1
        return self.fd

    def _done(self) -> None:
        """One use of the descriptor over; the last one closes it if close() came meanwhile (lock held)."""
        self.users -= 1
        if not self.users and self.closing >= 0:
            os.close(self.closing)
            self.closing = -1

    def _punch(self, page: int) -> None:
        from .posix import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, _fallocate

        _fallocate()(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, page * PAGE, PAGE)

    def _disk_get(self, fd: int, page: int, nowait: bool) -> bytes | None:
        """A page from the cache file (``nowait``: only from the host's page cache), None if not there."""
        buf = bytearray(PAGE)
        try:
            n = os.preadv(fd, [buf], page * PAGE, _NOWAIT if nowait else 0)
        except OSError:
            return None
        if n != PAGE:
            return None
        return bytes(buf[:self._page_len(page)])

    def _page_len(self, page: int) -> int:
        return min(PAGE, self.size - page * PAGE)

    # -- lookups --------------------------------------------------------------------------------------------
    def _get(self, page: int, nowait: bool) -> bytes | None:
        """A page from memory, else from the cache file (read with the lock let go: a reader on the event
        loop's thread never waits behind a disk read)."""
        with self.lock:
            data = self.memory.get(page)
            if data is not None:
                self.memory.move_to_end(page)
                return data
            written = self.disk.get(page)
            if written is None or (nowait and not _NOWAIT):
                return None
            self.disk.move_to_end(page)
            fd = self._use()
        try:
            data = self._disk_get(fd, page, nowait)
        finally:
            with self.lock:
                self._done()
        if data is None:
            return None
        with self.lock:
            if self.fd != fd or self.disk.get(page) != written:
                return None  # evicted (a hole now), written again or closed while it was read: a miss
            self._remember(page, data)
        return data

    def has(self, page: int) -> bool:
        with self.lock:
            return page in self.memory or page in self.disk

    def copy(self, offset: int, view: memoryview | bytearray, *, nowait: bool = False) -> bool:
        """Fill ``view`` with the object's bytes at ``offset`` if every page is cached (``nowait``: without a
        wait on the disk); False, and ``view`` partly filled, otherwise."""
        end = offset + len(view)
        page = offset // PAGE
        while page * PAGE < end:
            data = self._get(page, nowait)
            if data is None:
                return False
            lo = max(offset, page * PAGE)
            hi = min(end, page * PAGE + len(data))
            view[lo - offset:hi - offset] = data[lo - page * PAGE:hi - page * PAGE]
            page += 1
        return True

    def put(self, offset: int, data: memoryview) -> None:
        """Keep the pages of ``data`` (fetched from ``offset``, a page boundary; whole pages, or up to the end
        of the object)."""
        assert offset % PAGE == 0
        pages = []
        for start in range(0, len(data), PAGE):
            pages.append((offset // PAGE + start // PAGE, bytes(data[start:start + PAGE])))
        with self.lock:
            for page, chunk in pages:
                self._remember(page, chunk)
        if self.fd >= 0:
            for page, chunk in pages:
                self._disk_put(page, chunk)

    def _remember(self, page: int, data: bytes) -> None:
        """Keep a page in memory, the least recently used out past the bound (called with the lock held)."""
        self.memory[page] = data
        self.memory.move_to_end(page)
        while len(self.memory) > self.memory_limit:
            self.memory.popitem(last=False)

    def close(self) -> None:
        with self.lock:
            self.memory.clear()
            if self.fd >= 0:
                if self.users:
                    self.closing = self.fd  # the last user closes it
                else:
                    os.close(self.fd)
                self.fd = -1
