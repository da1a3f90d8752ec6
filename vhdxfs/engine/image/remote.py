"""S3File: the HostIO of an image that is an object in an S3 store, read-only.

Opening asks for the object's size and ETag (HEAD). From then on every GET names that ETag (If-Match): an
object replaced underneath answers 412 and the read fails with ESTALE, instead of one answer mixing two
images. The image's structures (headers, region table, metadata, BAT) are read once, by the open, like any
other image's; payload reads go through the block cache (blockcache.py: 4 KiB pages in memory, optionally
on disk):

- a read the cache holds is answered at once, also on the trio thread (``read_cached`` never waits on the
  network);
- a miss fetches the pages it lacks, one ranged GET per missing run, a large run in parallel parts; two
  readers of the same pages wait for one fetch;
- a read that starts where the last ended is sequential: the pages after it are fetched ahead in the
  background, the window doubling from 256 KiB to 8 MiB while the reads stay sequential;
- a read of 1 MiB or more (convert, a backup) goes straight into the caller's buffer in parallel parts and
  is not cached; while such reads are sequential, the next ones (up to 32 MiB ahead) are fetched meanwhile,
  so the store is never idle between two of them.

Faults: a 5xx, throttling (429, SlowDown), a timeout, a dropped connection, a short body or an answer for
another range is tried again with exponential backoff and jitter (``VHDXFS_S3_RETRIES`` times, 6 by
default, over about 10 s); a read that still fails raises HostIOError (EIO to a reader) and the next read
tries afresh, so a daemon serves again once the store is back. Nothing that failed a check is ever cached
or returned.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from ...errors import HostIOError, ReadOnlyError
from . import s3client
from .blockcache import PAGE, BlockCache
from .host import FileBase
from .locations import S3Location

T = TypeVar("T")
DIRECT = 1 << 20  # reads this large bypass the cache
PART = 4 << 20  # the size of one GET of a parallel fetch (RGW stores objects in 4 MiB stripes)
READAHEAD_MIN, READAHEAD_MAX = 256 << 10, 8 << 20
STREAM_AHEAD = 32 << 20  # bytes of large sequential reads fetched before they are asked for
CONCURRENCY = int(os.environ.get("VHDXFS_S3_CONCURRENCY", "8"))


class Stats:
    """What went over the network (tests and benchmarks read it)."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes_fetched = 0
        self.retries = 0
        self.failures = 0
        self.hits = 0
        self.misses = 0


class S3File(FileBase):
    """An object in a store, as a read-only image file."""

    path: S3Location

    def __init__(self, location: S3Location, *, writable: bool = False) -> None:
        if writable:
            raise ReadOnlyError("an image in an object store is only read: open it read-only (-o ro), or write "
                                "into a local child of it ('vhdxfs create CHILD.avhdx --parent URL')", path=location)
        self.path = location
        self.writable = False
        self.stats = Stats()
        self.retries = int(os.environ.get("VHDXFS_S3_RETRIES", "6"))
        self.client = s3client.store(location.bucket)
        info = self._retrying(lambda: s3client.head(location, self.client))
        self._size, self.etag = info.size, info.etag
        self.cache = BlockCache(self._size, memory_bytes=_env_size("VHDXFS_S3_MEMORY", 256 << 20),
                                directory=os.environ.get("VHDXFS_S3_CACHE_DIR") or None,
                                disk_bytes=_env_size("VHDXFS_S3_CACHE_SIZE", 4 << 30),
                                identity=f"{location}\0{self.etag}")
        self._pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="vhdxfs-s3")
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="vhdxfs-s3-ahead")
        self._streamer = ThreadPoolExecutor(4, thread_name_prefix="vhdxfs-s3-stream")
        self._stream: dict[tuple[int, int], Future[bytearray]] = {}
        self._lock = threading.Lock()
        self._inflight: dict[int, Future[None]] = {}
        self._next = -1  # where a sequential read would start
        self._window = READAHEAD_MIN
        self._ahead_to = 0  # the end of what readahead has asked for

    # -- requests, tried again ------------------------------------------------------------------------------
    def _retrying(self, call: Callable[[], T]) -> T:
        delay = 0.1
        for attempt in range(self.retries + 1):
            try:
                return call()
            except s3client.Transient as exc:
                if attempt == self.retries:
                    self.stats.failures += 1
                    raise HostIOError(f"{exc} (gave up after {attempt + 1} tries)", path=self.path,
                                      errno=errno.EIO) from None
                self.stats.retries += 1
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 4.0)
        raise AssertionError("unreachable")

    def _get(self, start: int, length: int) -> memoryview:
        def call() -> memoryview:
            data = s3client.get_range(self.path, start, length, self.etag, self._size, self.client)
            with self._lock:
                self.stats.requests += 1
                self.stats.bytes_fetched += len(data)
            return data
        return self._retrying(call)

    def _get_into(self, start: int, view: memoryview) -> None:
        view[:] = self._get(start, len(view))

    def _parallel(self, start: int, length: int, each: Callable[[int, int], None]) -> None:
        """``each(offset, length)`` over [start, start+length) in parts of PART, concurrently."""
        parts = [(o, min(PART, start + length - o)) for o in range(start, start + length, PART)]
        if len(parts) == 1:
            each(*parts[0])
            return
        futures = [self._pool.submit(each, o, n) for o, n in parts]
        errors = [f.exception() for f in futures]
        for exc in errors:
            if exc is not None:
                raise exc

    # -- the cache --------------------------------------------------------------------------------------------
    def _fetch_pages(self, first: int, last: int) -> None:
        """Make pages [first, last) cached: fetch the missing runs not already being fetched, wait for those
        that are."""
        waits: list[Future[None]] = []
        runs: list[tuple[int, int, Future[None]]] = []
        with self._lock:
            page = first
            while page < last:
                if self.cache.has(page):
                    page += 1
                    continue
                pending = self._inflight.get(page)
                if pending is not None:
                    waits.append(pending)
                    page += 1
                    continue
                run = page
                while page < last and not self.cache.has(page) and page not in self._inflight:
                    page += 1
                future: Future[None] = Future()
                for p in range(run, page):
                    self._inflight[p] = future
                runs.append((run, page, future))
        failure: BaseException | None = None
        for run, end, future in runs:
            try:
                start, stop = run * PAGE, min(end * PAGE, self._size)
                self._parallel(start, stop - start, lambda o, n: self.cache.put(o, self._get(o, n)))
                future.set_result(None)
            except BaseException as exc:
                future.set_exception(exc)
                failure = failure or exc
            finally:
                with self._lock:
                    for p in range(run, end):
                        if self._inflight.get(p) is future:
                            del self._inflight[p]
        for pending in waits:
            failure = failure or pending.exception()
        if failure is not None:
            raise failure

    def _sequential(self, offset: int, length: int) -> None:
        """Note a read; fetch ahead of a sequential one (in the background, never waited for)."""
        end = offset + length
        with self._lock:
            sequential = offset == self._next
            self._next = end
            if not sequential:
                self._window = READAHEAD_MIN
                self._ahead_to = end
                return
            if self._ahead_to - end > self._window // 2:
                return  # far enough ahead still
            start = max(end, self._ahead_to)
            stop = min(self._size, end + self._window)
            self._window = min(self._window * 2, READAHEAD_MAX)
            if start >= stop:
                return
            self._ahead_to = stop
        self._ahead.submit(self._read_ahead, start // PAGE, (stop + PAGE - 1) // PAGE)

    def _fetch_bytes(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        view = memoryview(buf)
        self._parallel(offset, length, lambda o, n: self._get_into(o, view[o - offset:o - offset + n]))
        return buf

    def _direct(self, offset: int, view: memoryview) -> None:
        """A large read: from what was fetched ahead for it, else fetched now; the next ones are fetched ahead
        while the reads stay sequential."""
        length = len(view)
        with self._lock:
            sequential = offset == self._next
            self._next = offset + length
            ready = self._stream.pop((offset, length), None)
            if not sequential:
                for stale in self._stream.values():
                    stale.cancel()
                self._stream.clear()
            else:
                for k in range(1, max(1, STREAM_AHEAD // length) + 1):
                    key = (offset + k * length, length)
                    if key[0] + length <= self._size and key not in self._stream:
                        self._stream[key] = self._streamer.submit(self._fetch_bytes, *key)
        if ready is not None:
            try:
                view[:] = ready.result()
                return
            except Exception:  # noqa: S110 - fetched again below, with its own tries
                pass
        self._parallel(offset, length, lambda o, n: self._get_into(o, view[o - offset:o - offset + n]))

    def _read_ahead(self, first: int, last: int) -> None:
        try:
            self._fetch_pages(first, last)
        except Exception:  # noqa: S110 - a failed readahead costs the reader a fetch of its own, nothing else
            pass

    # -- HostIO -------------------------------------------------------------------------------------------------
    def size(self) -> int:
        return self._size

    def pread_into(self, offset: int, view: memoryview) -> None:
        length = min(len(view), max(0, self._size - offset))
        if length < len(view):
            view[length:] = bytes(len(view) - length)
            view = view[:length]
        if not length:
            return
        if length >= DIRECT:
            self._direct(offset, view)
            return
        self._sequential(offset, length)
        for _ in range(8):
            if self.cache.copy(offset, view):
                self.stats.hits += 1
                return
            self.stats.misses += 1
            self._fetch_pages(offset // PAGE, (offset + length + PAGE - 1) // PAGE)
        raise HostIOError("the block cache is too small for the reads it serves (set VHDXFS_S3_MEMORY higher)",
                          path=self.path, errno=errno.EIO)

    def read_cached(self, offset: int, view: memoryview | bytearray) -> bool:
        if offset + len(view) > self._size or not self.cache.copy(offset, view, nowait=True):
            return False
        self.stats.hits += 1
        self._sequential(offset, len(view))
        return True

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise HostIOError("an image in an object store is only read", path=self.path, errno=errno.EROFS)

    def fdatasync(self) -> None:
        return None

    def truncate(self, size: int) -> None:
        raise HostIOError("an image in an object store is only read", path=self.path, errno=errno.EROFS)

    def punch_hole(self, offset: int, length: int) -> bool:
        return False

    def set_writable(self, writable: bool) -> None:
        if writable:
            raise ReadOnlyError("an image in an object store is only read: a merge into it is refused (merge into a "
                                "local copy, then upload it with 'vhdxfs convert')", path=self.path)

    def close(self) -> None:
        self._ahead.shutdown(wait=True, cancel_futures=True)
        self._streamer.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True)
        self.cache.close()


def _env_size(name: str, default: int) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    from ...sizes import parse_size

    return parse_size(text)
