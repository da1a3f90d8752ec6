"""AsyncDisk.write: a write into one present block is queued at once, and keeps the write-back queue's rules.

The FUSE daemon's writes take this short way (engine/aio/disk.py); these tests hold the host's payload writes
at a gate so "queued, not yet in the file" can be seen, and inject a failed payload write.
"""

from __future__ import annotations

import errno
import threading

import pytest
import trio

from vhdxfs.engine import ImageSpec, PosixFile, create_image
from vhdxfs.engine.aio import AsyncDisk
from vhdxfs.errors import HostIOError

MiB = 1 << 20
TIMEOUT = 10


class PayloadGate(PosixFile):
    """The image file; payload-sized writes (4 KiB) wait for ``gate`` and may fail once with ``fail``."""

    gate = threading.Event()
    fail: int | None = None

    def pwrite(self, offset, data) -> None:
        if len(data) == 4096:
            PayloadGate.gate.wait(TIMEOUT)
            if (err := PayloadGate.fail) is not None:
                PayloadGate.fail = None
                raise HostIOError("injected", path=self.path, errno=err)
        super().pwrite(offset, data)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.vhdx"
    create_image(path, ImageSpec(virtual_size=64 * MiB))
    PayloadGate.gate.set()
    PayloadGate.fail = None
    yield path
    PayloadGate.gate.set()


async def test_a_write_into_a_present_block_returns_while_the_host_write_is_still_held(image):
    async with await AsyncDisk.open(image, host_factory=PayloadGate) as disk:
        await disk.write(0, b"a" * 4096)  # allocates the block (the long way)
        await disk.flush()
        PayloadGate.gate.clear()
        with trio.fail_after(TIMEOUT):
            await disk.write(8192, b"b" * 4096)  # the short way: queued, acknowledged
        assert await _read_after_release(disk, 8192) == b"b" * 4096


async def _read_after_release(disk: AsyncDisk, offset: int) -> bytes:
    async with trio.open_nursery() as nursery:
        result: list[bytes] = []

        async def read() -> None:
            result.append(bytes(await disk.read(offset, 4096)))

        nursery.start_soon(read)
        await trio.sleep(0.05)
        assert not result, "a read of a range with a queued write did not wait for it"
        PayloadGate.gate.set()
    return result[0]


async def test_a_failed_queued_write_is_raised_by_the_next_one_block_write_and_by_flush(image):
    async with await AsyncDisk.open(image, host_factory=PayloadGate) as disk:
        await disk.write(0, b"a" * 4096)
        await disk.flush()
        PayloadGate.fail = errno.EIO
        await disk.write(4096, b"lost" * 1024)  # acknowledged; it fails in the writer thread
        await _settled(disk)
        with pytest.raises(HostIOError) as on_write:
            await disk.write(8192, b"c" * 4096)  # into the same present block: must not be queued
        assert on_write.value.errno == errno.EIO
        with pytest.raises(HostIOError):
            await disk.flush()
        await disk.write(8192, b"d" * 4096)  # reported once; writes go on
        await disk.flush()
        assert bytes(await disk.read(8192, 4096)) == b"d" * 4096


async def _settled(disk: AsyncDisk) -> None:
    """Until the failed write has been applied: a read of its range waits for exactly that."""
    await disk.read(4096, 512)
