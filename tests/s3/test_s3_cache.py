"""The S3 host's economy: the block cache (4 KiB pages, memory bound, the on-disk cache directory), readahead
for sequential reads, direct reads of large ranges, reads from the trio thread that never wait, and the
client loaded only when an s3:// URL is met."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio

import vhdxfs
from vhdxfs.engine.image.blockcache import PAGE, BlockCache
from vhdxfs.engine.image.locations import parse
from vhdxfs.engine.image.remote import S3File


@contextmanager
def _host(url: str) -> Iterator[S3File]:
    host = S3File(parse(url))
    try:
        yield host
    finally:
        host.close()


def test_cache_pages_memory_bound_and_disk(tmp_path):
    data = os.urandom(10 * PAGE + 100)
    cache = BlockCache(len(data), memory_bytes=256 * PAGE, directory=str(tmp_path), identity="a")
    view = memoryview(bytearray(5000))
    assert not cache.copy(3000, view)
    cache.put(0, memoryview(data[:8 * PAGE]))
    assert cache.copy(3000, view) and bytes(view) == data[3000:8000]
    cache.put(8 * PAGE, memoryview(data[8 * PAGE:]))  # the short last page
    tail = memoryview(bytearray(PAGE + 100))
    assert cache.copy(9 * PAGE, tail) and bytes(tail) == data[9 * PAGE:]
    cache.close()
    again = BlockCache(len(data), memory_bytes=256 * PAGE, directory=str(tmp_path), identity="a")
    assert again.copy(0, view) and bytes(view) == data[:5000]  # found on disk by SEEK_DATA
    other = BlockCache(len(data), directory=str(tmp_path), identity="another etag")
    assert not other.copy(0, view)  # a replaced object never meets the old one's pages
    again.close()
    other.close()


def test_memory_bound_evicts_least_recently_used():
    cache = BlockCache(1000 * PAGE, memory_bytes=256 * PAGE)
    cache.put(0, memoryview(bytes(300 * PAGE)))
    assert len(cache.memory) == 256 and not cache.has(0) and cache.has(299)


def test_a_page_evicted_while_read_from_disk_is_a_miss(tmp_path):
    """The cache file is read with the lock let go: a page whose hole is punched meanwhile (evicted by another
    thread's put) reads back as zeros, and must count as a miss, never as the page."""
    data = os.urandom(600 * PAGE)
    cache = BlockCache(len(data), memory_bytes=256 * PAGE, directory=str(tmp_path), disk_bytes=256 * PAGE,
                       identity="a")
    cache.put(0, memoryview(data[:PAGE]))
    cache.memory.clear()  # the page now only on disk
    view = memoryview(bytearray(PAGE))
    assert cache.copy(0, view) and bytes(view) == data[:PAGE]
    cache.memory.clear()
    read = cache._disk_get

    def evicted_meanwhile(fd: int, page: int, nowait: bool) -> bytes | None:
        cache.put(PAGE, memoryview(data[PAGE:300 * PAGE]))  # 299 more pages: page 0 punched out
        return read(fd, page, nowait)

    cache._disk_get = evicted_meanwhile  # type: ignore[method-assign]
    assert not cache.copy(0, view)
    cache.close()


def test_the_cache_file_is_closed_after_the_read_under_way(tmp_path):
    """close() during a read of the cache file leaves the descriptor open for that read (a number the OS
    handed out again would be read as the cache), and the last user closes it; the page is then a miss."""
    data = os.urandom(8 * PAGE)
    cache = BlockCache(len(data), directory=str(tmp_path), identity="a")
    cache.put(0, memoryview(data))
    cache.memory.clear()
    fd = cache.fd
    read = cache._disk_get
    seen: list[bytes | None] = []

    def closed_meanwhile(fd_: int, page: int, nowait: bool) -> bytes | None:
        cache.close()
        os.fstat(fd_)  # still open: the read under way holds it
        seen.append(read(fd_, page, nowait))
        return seen[-1]

    cache._disk_get = closed_meanwhile  # type: ignore[method-assign]
    assert not cache.copy(0, memoryview(bytearray(PAGE)))
    assert seen == [data[:PAGE]]
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the read, its last user


def test_random_reads_fetch_about_what_they_read(images):
    """A random 4 KiB read costs one 4 KiB GET: bytes fetched over bytes read stays near 1."""
    path, url = images["fixed"]
    with _host(url) as host:
        rnd = random.Random(1)
        host.stats.bytes_fetched = 0
        read = 0
        for _ in range(300):
            off = rnd.randrange(1 << 20, host.size() - 8192) // 4096 * 4096
            buf = memoryview(bytearray(4096))
            host.pread_into(off, buf)
            read += 4096
            with open(path, "rb") as f:
                f.seek(off)
                assert bytes(buf) == f.read(4096)
        assert host.stats.bytes_fetched / read < 1.5, host.stats.__dict__


def test_sequential_reads_are_fetched_ahead(images):
    path, url = images["fixed"]
    with _host(url) as host:
        local = path.read_bytes()
        off, step = 1 << 20, 64 << 10
        requests_before = host.stats.requests
        while off + step <= 12 << 20:
            buf = memoryview(bytearray(step))
            host.pread_into(off, buf)
            assert bytes(buf) == local[off:off + step]
            off += step
        reads = (11 << 20) // step
        assert host.stats.requests - requests_before < reads / 3, host.stats.__dict__
        assert host.stats.hits > reads / 2


def test_large_reads_go_direct(images):
    path, url = images["fixed"]
    with _host(url) as host:
        buf = memoryview(bytearray(5 << 20))
        host.pread_into(1 << 20, buf)
        assert bytes(buf) == path.read_bytes()[1 << 20:6 << 20]
        assert not host.cache.memory or len(host.cache.memory) * PAGE < (5 << 20)


async def test_the_trio_driver_reads_a_remote_image(images):
    from vhdxfs.engine.aio import AsyncDisk

    path, url = images["dynamic"]
    disk = await AsyncDisk.open(url, read_only=True)
    try:
        with vhdxfs.open(path) as f:
            expected = f.read()
        rnd = random.Random(4)
        async with trio.open_nursery() as nursery:
            async def reader(seed: int) -> None:
                r = random.Random(seed)
                for _ in range(30):
                    off = r.randrange(disk.size - 70000)
                    n = r.choice((512, 4096, 65536))
                    assert bytes(await disk.read(off, n)) == expected[off:off + n]
            for i in range(4):
                nursery.start_soon(reader, rnd.randrange(1000) + i)
    finally:
        await disk.close()


# `python -c _LOADS local|remote COMMAND ARGS...`: runs the CLI as `vhdxfs COMMAND ARGS...`, then checks that
# the S3 client was loaded for "remote" and not for "local".
_LOADS = ("import sys; from vhdxfs.cli import main; "
          "assert main(sys.argv[2:]) == 0; "
          "loaded = {'obstore', 'vhdxfs.engine.image.remote', 'vhdxfs.engine.image.s3client'} & set(sys.modules); "
          "assert bool(loaded) == (sys.argv[1] == 'remote'), loaded")


def test_a_local_image_loads_no_s3_client(tmp_path):
    """`vhdxfs info` (and map, check) of a local image, run as the CLI runs it, imports no S3 client; an s3://
    URL does (the check can fail both ways)."""
    image = tmp_path / "x.vhdx"
    from vhdxfs.engine import ImageSpec, create_image

    create_image(image, ImageSpec(1 << 20))
    for command in ("info", "map", "check"):
        subprocess.run([sys.executable, "-c", _LOADS, "local", command, str(image)], check=True,
                       stdout=subprocess.DEVNULL)


def test_a_remote_image_loads_the_s3_client(images):
    subprocess.run([sys.executable, "-c", _LOADS, "remote", "info", images["dynamic"][1]], check=True,
                   stdout=subprocess.DEVNULL)
