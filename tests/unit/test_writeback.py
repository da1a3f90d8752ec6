"""The write-back queue: writes are acknowledged once queued, and nothing that depends on them sees otherwise."""

from __future__ import annotations

import errno
import threading

import pytest
import trio

from vhdxfs.engine.hostfile import HostFile
from vhdxfs.engine.writeback import WriteBack
from vhdxfs.errors import HostIOError


class GatedHost(HostFile):
    """A real HostFile whose pwrite waits for ``gate`` and records what reached it."""

    def __init__(self, path, **kwargs) -> None:
        super().__init__(path, writable=True, lock=False, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.applied: list[tuple[int, bytes]] = []
        self.fail_next: OSError | None = None

    def pwrite(self, offset, data) -> None:
        self.gate.wait()
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise HostIOError(exc.strerror, path=self.path, errno=exc.errno)
        super().pwrite(offset, data)
        self.applied.append((offset, bytes(data)))


@pytest.fixture
def host(tmp_path):
    path = tmp_path / "host.img"
    path.write_bytes(bytes(1 << 20))
    h = GatedHost(path)
    yield h
    h.gate.set()
    h.close()


async def open_gate_soon(host: GatedHost) -> None:
    await trio.sleep(0.05)  # long enough for the waiter to be really waiting
    host.gate.set()


async def test_overlapping_writes_land_in_the_order_they_were_queued(host):
    host.gate.clear()
    for i in range(50):
        await host.apwrite(1000 + i, bytes([i]) * 100)
    host.gate.set()
    await host.afdatasync()
    expected = bytearray(150)
    for i in range(50):
        expected[i:i + 100] = bytes([i]) * 100
    assert host.pread(1000, 150) == expected


async def test_a_read_sees_a_write_still_in_the_queue(host):
    host.gate.clear()
    await host.apwrite(4096, b"queued" * 100)
    assert host.applied == []  # certainly still queued
    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_gate_soon, host)
        assert await host.apread(4096, 600) == b"queued" * 100


async def test_a_read_elsewhere_does_not_wait_for_the_queue(host):
    host.gate.clear()
    await host.apwrite(0, b"x" * 4096)
    with trio.fail_after(5):
        assert await host.apread(3 << 20, 4096) == bytes(4096)  # another MiB of the file: no wait
    host.gate.set()


async def test_fdatasync_returns_only_after_every_queued_write_reached_the_file(host):
    host.gate.clear()
    for i in range(10):
        await host.apwrite(i * 4096, bytes([i + 1]) * 4096)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_gate_soon, host)
        await host.afdatasync()
        assert [offset for offset, _ in host.applied] == [i * 4096 for i in range(10)]


async def test_a_failed_write_fails_the_next_write_and_once_the_next_flush(host):
    host.fail_next = OSError(errno.ENOSPC, "No space left on device")
    await host.apwrite(0, b"lost")  # acknowledged: the failure comes later
    await host.writeback.settle()
    with pytest.raises(HostIOError) as on_write:
        await host.apwrite(8, b"more")
    assert on_write.value.errno == errno.ENOSPC
    with pytest.raises(HostIOError) as on_flush:
        await host.afdatasync()
    assert on_flush.value.errno == errno.ENOSPC
    await host.afdatasync()  # reported once, as the page cache reports writeback errors
    await host.apwrite(8, b"more")  # and writes go on


async def test_writes_queued_after_a_failed_one_are_still_applied(host):
    host.gate.clear()
    host.fail_next = OSError(errno.EIO, "Input/output error")
    await host.apwrite(0, b"a" * 512)
    await host.apwrite(512, b"b" * 512)
    host.gate.set()
    with pytest.raises(HostIOError):
        await host.afdatasync()
    assert host.pread(512, 512) == b"b" * 512


async def test_a_buffer_changed_after_write_returns_does_not_change_what_is_written(host):
    host.gate.clear()
    buf = bytearray(b"original" * 64)
    await host.apwrite(0, memoryview(buf)[:256])
    buf[:] = b"CHANGED!" * 64  # the caller reuses its buffer at once
    host.gate.set()
    await host.afdatasync()
    assert host.pread(0, 256) == (b"original" * 64)[:256]


async def test_the_queue_never_holds_more_than_its_limit():
    high_water = 0
    release = threading.Event()

    def slow_write(offset: int, view: memoryview) -> None:
        nonlocal high_water
        high_water = max(high_water, wb._issued_bytes - wb._done_bytes)
        release.wait(0.001)

    wb = WriteBack(slow_write, limit=64 << 10)
    try:
        for i in range(200):
            await wb.write(i * 4096, bytes(4096))
        await wb.settle()
        assert 0 < high_water <= 64 << 10
    finally:
        wb.close()


async def test_punching_a_hole_waits_for_older_writes_to_the_range(host):
    host.gate.clear()
    await host.apwrite(64 << 10, b"\xff" * 4096)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_gate_soon, host)
        await host.apunch_hole(64 << 10, 4096)
    assert host.pread(64 << 10, 4096) == bytes(4096)  # the hole, not the older write, is what stays


async def test_close_applies_what_is_queued(tmp_path):
    path = tmp_path / "close.img"
    path.write_bytes(bytes(8192))
    h = GatedHost(path)
    await h.apwrite(4096, b"kept" * 1024)
    h.close()
    assert path.read_bytes()[4096:] == b"kept" * 1024


async def test_a_read_only_file_has_no_queue_and_refuses_writes(tmp_path):
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(4096))
    h = HostFile(path, writable=False, lock=False)
    try:
        assert h.writeback is None
        with pytest.raises(HostIOError):
            await h.apwrite(0, b"x")
    finally:
        h.close()
