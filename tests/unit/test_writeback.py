"""The write-back queue: a write is acknowledged once queued, and nothing that depends on it sees otherwise.

WriteBack is tested on its own with a writer callable over a bytearray, and through AsyncHost (the daemon's
StepIO), which queues payload writes for its HostIO's ``pwrite``. Wherever a test needs a write to be
certainly still queued, the writer waits on a threading.Event (its gate); ``wait_all_tasks_blocked`` tells
when the task under test waits for it.
"""

from __future__ import annotations

import errno
import gc
import threading
import weakref
from pathlib import Path

import outcome
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from vhdxfs.engine import ImageSpec, MemoryFile, PosixFile, create_image
from vhdxfs.engine.aio import AsyncDisk, AsyncHost
from vhdxfs.engine.aio.writeback import GRANULE, WriteBack
from vhdxfs.errors import HostIOError

TIMEOUT = 2  # seconds: a test that hits it has found a wait that never ends
KiB = 1 << 10


class Background:
    """A call running in its own task; ``done`` once it returned or raised, ``result`` its outcome."""

    def __init__(self, nursery: trio.Nursery, afn, *args) -> None:
        self.done = False
        self.result: outcome.Outcome | None = None
        self.cancel_scope = trio.CancelScope()
        nursery.start_soon(self._run, afn, args)

    async def _run(self, afn, args) -> None:
        with self.cancel_scope:  # a cancelled call ends with no result
            try:
                self.result = outcome.Value(await afn(*args))
            except Exception as exc:
                self.result = outcome.Error(exc)
        self.done = True

    @classmethod
    async def start(cls, nursery: trio.Nursery, afn, *args) -> Background:
        """Start ``afn(*args)`` and return once it, and every other task, waits for something."""
        task = cls(nursery, afn, *args)
        await wait_all_tasks_blocked()
        return task


# -- WriteBack on its own ------------------------------------------------------------------------------------
class HeldWriter:
    """The writer callable: applies writes to ``file`` once ``gate`` is open, in the order it gets them."""

    def __init__(self, size: int = 64 * KiB) -> None:
        self.file = bytearray(size)
        self.gate = threading.Event()
        self.gate.set()
        self.applied: list[tuple[int, bytes]] = []
        self.sources: list[object] = []  # the object each write's view reads from
        self.fail_at: dict[int, OSError] = {}  # offset -> the error a write there raises (once)

    def __call__(self, offset: int, view: memoryview) -> None:
        self.gate.wait(TIMEOUT)
        self.sources.append(view.obj)
        if (exc := self.fail_at.pop(offset, None)) is not None:
            raise exc
        self.file[offset:offset + len(view)] = view
        self.applied.append((offset, bytes(view)))


@pytest.fixture
def writer():
    w = HeldWriter()
    yield w
    w.gate.set()


@pytest.fixture
def wb(writer):
    q = WriteBack(writer)
    yield q
    writer.gate.set()
    q.close()


async def test_a_write_is_acknowledged_while_the_writer_has_not_applied_it(writer, wb):
    writer.gate.clear()
    with trio.fail_after(TIMEOUT):
        await wb.write(100, b"queued")
    assert wb.busy
    assert writer.applied == []
    writer.gate.set()
    await wb.settle()
    assert writer.applied == [(100, b"queued")]
    assert not wb.busy


async def test_overlapping_writes_land_in_the_order_they_were_queued(writer, wb):
    expected = bytearray(len(writer.file))
    order = []
    writer.gate.clear()  # the first half piles up behind a held writer, the second races a running one
    for i in range(200):
        if i == 100:
            writer.gate.set()
        offset = 1000 + (i * 37) % 300
        data = bytes([i]) * (64 + i % 50)
        expected[offset:offset + len(data)] = data
        order.append(offset)
        await wb.write(offset, data)
    await wb.settle()
    assert [offset for offset, _ in writer.applied] == order
    assert writer.file == expected


async def test_settling_a_range_waits_for_the_queued_writes_to_it(writer, wb):
    writer.gate.clear()
    await wb.write(4096, b"w" * 4096)
    async with trio.open_nursery() as nursery:
        settle = await Background.start(nursery, wb.settle, 6000, 100)
        assert not settle.done, "settle returned while a write to its range was still queued"
        writer.gate.set()
    assert writer.applied == [(4096, b"w" * 4096)]


async def test_settling_a_range_with_no_queued_writes_does_not_wait(writer, wb):
    writer.gate.clear()
    await wb.write(0, b"w" * 4096)
    with trio.fail_after(TIMEOUT):
        await wb.settle(8 * GRANULE, 4096)
    assert writer.applied == []


async def test_settling_everything_waits_for_every_queued_write(writer, wb):
    writer.gate.clear()
    await wb.write(0, b"a")
    await wb.write(5 * GRANULE, b"b")
    async with trio.open_nursery() as nursery:
        settle = await Background.start(nursery, wb.settle)
        assert not settle.done
        writer.gate.set()
    assert writer.applied == [(0, b"a"), (5 * GRANULE, b"b")]


async def test_a_failed_write_is_raised_by_every_later_write_until_it_is_taken(writer, wb):
    failure = OSError(errno.EIO, "Input/output error")
    writer.fail_at[0] = failure
    await wb.write(0, b"lost")  # acknowledged: the failure comes later
    await wb.settle()
    for _ in range(2):
        with pytest.raises(OSError) as raised:
            await wb.write(512, b"refused")
        assert raised.value is failure
    assert wb.take_error() is failure
    assert wb.take_error() is None  # taken once
    await wb.write(512, b"accepted")
    await wb.settle()
    assert writer.applied == [(512, b"accepted")]


async def test_writes_queued_after_a_failed_one_are_still_applied(writer, wb):
    writer.gate.clear()
    writer.fail_at[0] = OSError(errno.ENOSPC, "No space left on device")
    for offset in (0, 512, 1024):
        await wb.write(offset, bytes([offset // 512 + 1]) * 512)
    writer.gate.set()
    await wb.settle()
    assert writer.applied == [(512, b"\x02" * 512), (1024, b"\x03" * 512)]
    assert wb.take_error().errno == errno.ENOSPC


@pytest.mark.parametrize(("limit", "size"), [(8 * KiB, 4 * KiB), (64 * KiB, 4 * KiB), (64 * KiB, 3000)])
async def test_the_queued_bytes_never_exceed_the_limit(limit, size):
    gate = threading.Event()  # holds the first write until the queue is full and its writer waits
    applied = 0  # bytes the writer has finished with (counted before the queue counts them)

    def write(offset: int, view: memoryview) -> None:
        nonlocal applied
        gate.wait(TIMEOUT)
        applied += len(view)

    wb = WriteBack(write, limit=limit)
    queued = high_water = 0

    async def fill() -> None:
        nonlocal queued, high_water
        for i in range(100):
            await wb.write(i * size, bytes(size))
            queued += size
            high_water = max(high_water, queued - applied)

    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fill)
                await wait_all_tasks_blocked()  # the queue is full: the filler waits for room
                assert queued < 100 * size
                gate.set()
            await wb.settle()
        assert applied == 100 * size
        assert limit - size < high_water <= limit
    finally:
        gate.set()
        wb.close()


async def test_a_write_larger_than_the_limit_is_accepted_by_an_empty_queue(writer):
    wb = WriteBack(writer, limit=4 * KiB)
    try:
        with trio.fail_after(TIMEOUT):
            await wb.write(0, b"x" * (16 * KiB))
            await wb.settle()
        assert writer.applied == [(0, b"x" * (16 * KiB))]
    finally:
        wb.close()


@pytest.mark.parametrize("make_buffer", [
    pytest.param(lambda raw: bytearray(raw), id="bytearray"),
    pytest.param(lambda raw: memoryview(bytearray(raw)), id="memoryview of a bytearray"),
    pytest.param(lambda raw: memoryview(bytearray(b"##" + raw + b"##"))[2:-2], id="slice of a bytearray"),
    pytest.param(lambda raw: memoryview(memoryview(bytearray(raw))), id="view of a view of a bytearray"),
])
async def test_a_mutable_buffer_changed_after_write_returns_does_not_change_what_is_written(writer, wb, make_buffer):
    raw = b"original" * 64
    buffer = make_buffer(raw)
    writer.gate.clear()
    await wb.write(0, buffer)
    buffer[:] = b"CHANGED!" * 64  # the caller reuses its buffer at once
    writer.gate.set()
    await wb.settle()
    assert writer.applied == [(0, raw)]


@pytest.mark.parametrize("as_given", [lambda raw: raw, lambda raw: memoryview(raw)[8:]], ids=["bytes", "view of bytes"])
async def test_bytes_reach_the_writer_without_a_copy(writer, wb, as_given):
    raw = b"immutable" * 100
    await wb.write(0, as_given(raw))
    await wb.settle()
    assert writer.sources[0] is raw


async def test_close_applies_every_queued_write_before_it_returns(writer):
    wb = WriteBack(writer)
    writer.gate.clear()
    for i in range(5):
        await wb.write(i * 100, bytes([i + 1]) * 100)
    opener = threading.Timer(0.05, writer.gate.set)  # close() blocks this thread: another opens the gate
    opener.start()
    try:
        wb.close()
        assert [offset for offset, _ in writer.applied] == [0, 100, 200, 300, 400]
        assert not wb.busy
    finally:
        opener.cancel()
        writer.gate.set()


# -- AsyncHost's use of the queue ------------------------------------------------------------------------------
class GatedHost(PosixFile):
    """A real host file whose pwrite waits for ``gate``; ``log`` records the writes and syncs in order;
    ``aio`` is the AsyncHost over it, as the daemon's engine uses it."""

    def __init__(self, path) -> None:
        super().__init__(path, writable=True, lock=False)
        self.aio = AsyncHost(self)
        self.gate = threading.Event()
        self.gate.set()
        self.log: list[tuple] = []
        self.fail_at: dict[int, int] = {}  # offset -> errno a pwrite there fails with (once)
        self.fail_sync: int | None = None
        self.reached: dict[int, threading.Event] = {}  # offset -> set once a pwrite there is done or failed

    def pwrite(self, offset, data) -> None:
        self.gate.wait(TIMEOUT)
        try:
            if (err := self.fail_at.pop(offset, None)) is not None:
                self.log.append(("failed", offset))
                raise HostIOError("injected", path=self.path, errno=err)
            super().pwrite(offset, data)
            self.log.append(("pwrite", offset, bytes(data)))
        finally:
            if offset in self.reached:
                self.reached[offset].set()

    def fdatasync(self) -> None:
        if (err := self.fail_sync) is not None:
            self.fail_sync = None
            raise HostIOError("injected", path=self.path, errno=err)
        super().fdatasync()
        self.log.append(("fdatasync",))

    def writes(self) -> list[int]:
        return [entry[1] for entry in self.log if entry[0] == "pwrite"]


@pytest.fixture
def host(tmp_path):
    path = tmp_path / "host.img"
    path.write_bytes(bytes(1 << 20))
    h = GatedHost(path)
    yield h
    h.gate.set()
    h.aio.writeback.close()
    h.close()


async def test_a_read_through_the_host_file_sees_a_write_still_queued(host):
    host.gate.clear()
    await host.aio.pwrite(4096, b"queued" * 100)
    assert host.log == []  # certainly still queued
    async with trio.open_nursery() as nursery:
        read = await Background.start(nursery, host.aio.pread, 4000, 800)  # overlaps the write's range
        assert not read.done, "the read did not wait for the queued write to its range"
        host.gate.set()
    assert read.result.unwrap() == bytes(96) + b"queued" * 100 + bytes(104)


async def test_a_read_of_a_range_without_queued_writes_does_not_wait_for_the_queue(host):
    host.gate.clear()
    await host.aio.pwrite(0, b"x" * 4096)
    with trio.fail_after(TIMEOUT):
        assert await host.aio.pread(3 * GRANULE, 4096) == bytes(4096)  # past the granule the write is in
    assert host.log == []


async def test_fdatasync_returns_only_after_every_queued_write_reached_pwrite(host):
    host.gate.clear()
    for i in range(10):
        await host.aio.pwrite(i * 4096, bytes([i + 1]) * 4096)
    async with trio.open_nursery() as nursery:
        sync = await Background.start(nursery, host.aio.fdatasync)
        assert not sync.done, "fdatasync returned while writes were still queued"
        host.gate.set()
    sync.result.unwrap()
    assert host.log == [("pwrite", i * 4096, bytes([i + 1]) * 4096) for i in range(10)] + [("fdatasync",)]


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
async def test_a_failed_write_is_raised_by_the_next_writes_and_once_by_fdatasync(host, err):
    host.fail_at[0] = err
    await host.aio.pwrite(0, b"lost")  # acknowledged: the failure comes later
    await host.aio.writeback.settle()
    for offset in (8, 16):
        with pytest.raises(HostIOError) as on_write:
            await host.aio.pwrite(offset, b"refused")
        assert on_write.value.errno == err
    with pytest.raises(HostIOError) as on_flush:
        await host.aio.fdatasync()
    assert on_flush.value.errno == err
    await host.aio.fdatasync()  # reported once, as the page cache reports a writeback error
    await host.aio.pwrite(8, b"accepted")  # and writes go on
    await host.aio.fdatasync()
    assert host.pread(0, 16) == bytes(8) + b"accepted"


async def test_writes_queued_after_a_failed_one_still_reach_the_file(host):
    host.gate.clear()
    host.fail_at[0] = errno.EIO
    await host.aio.pwrite(0, b"a" * 512)
    await host.aio.pwrite(512, b"b" * 512)
    host.gate.set()
    with pytest.raises(HostIOError):
        await host.aio.fdatasync()
    assert host.writes() == [512]
    assert host.pread(0, 1024) == bytes(512) + b"b" * 512


async def test_a_failed_fdatasync_is_raised_by_fdatasync(host):
    await host.aio.pwrite(0, b"data")
    host.fail_sync = errno.EIO
    with pytest.raises(HostIOError) as raised:
        await host.aio.fdatasync()
    assert raised.value.errno == errno.EIO
    await host.aio.fdatasync()
    assert host.log[-1] == ("fdatasync",)


async def test_a_write_failing_after_a_flush_was_queued_is_reported_by_a_later_flush(host):
    host.gate.clear()
    host.fail_at[0] = errno.EIO  # a write before the flush fails...
    host.fail_at[4096] = errno.ENOSPC  # ...and so does one queued while the flush waits
    host.reached[4096] = threading.Event()
    await host.aio.pwrite(0, b"a" * 512)
    async with trio.open_nursery() as nursery:
        first = await Background.start(nursery, host.aio.fdatasync)
        await host.aio.pwrite(4096, b"b" * 512)  # accepted: the first failure is not known yet
        host.gate.set()
        assert host.reached[4096].wait(TIMEOUT)  # the trio thread stays here until the second write failed
    with pytest.raises(HostIOError):
        first.result.unwrap()
    assert host.pread(4096, 512) == bytes(512)  # the second write is lost...
    with pytest.raises(HostIOError):
        await host.aio.fdatasync()  # ...so the flush that covers it must not report success


async def test_a_cancelled_fdatasync_still_syncs_in_its_turn(host):
    host.gate.clear()
    await host.aio.pwrite(0, b"data")
    async with trio.open_nursery() as nursery:
        sync = await Background.start(nursery, host.aio.fdatasync)
        sync.cancel_scope.cancel()
        await wait_all_tasks_blocked()
        assert sync.done and sync.result is None  # it stopped waiting
    host.gate.set()
    await host.aio.writeback.settle()
    assert host.log == [("pwrite", 0, b"data"), ("fdatasync",)]


@pytest.mark.parametrize("method", ["punch_hole", "write_zeros"])
async def test_zeroing_a_range_is_ordered_after_the_queued_writes_to_it(host, method):
    host.gate.clear()
    await host.aio.pwrite(64 * KiB, b"\xff" * 4096)
    async with trio.open_nursery() as nursery:
        zeroing = await Background.start(nursery, getattr(host.aio, method), 64 * KiB, 4096)
        assert not zeroing.done
        host.gate.set()
    if method == "punch_hole" and zeroing.result.unwrap() is False:
        pytest.skip("this file system cannot punch holes")
    assert host.pread(64 * KiB, 4096) == bytes(4096)  # the zeros, not the older write, are what stays


async def test_shrinking_the_file_is_ordered_after_the_queued_writes_past_the_new_end(host):
    host.gate.clear()
    await host.aio.pwrite(512 * KiB, b"w" * 4096)
    async with trio.open_nursery() as nursery:
        shrink = await Background.start(nursery, host.aio.truncate, 4096)
        assert not shrink.done
        host.gate.set()
    shrink.result.unwrap()
    assert host.size() == 4096  # the older write did not extend the file again


async def test_growing_the_file_does_not_wait_for_the_queued_writes(host):
    host.gate.clear()
    await host.aio.pwrite(0, b"w" * 4096)
    with trio.fail_after(TIMEOUT):
        await host.aio.truncate(2 << 20)
    assert host.size() == 2 << 20
    assert host.log == []


async def test_closing_the_host_file_applies_the_queued_writes_first(tmp_path):
    path = tmp_path / "close.img"
    path.write_bytes(bytes(8192))
    h = GatedHost(path)
    h.gate.clear()
    await h.aio.pwrite(4096, b"kept" * 1024)
    opener = threading.Timer(0.05, h.gate.set)  # close() blocks this thread: another opens the gate
    opener.start()
    try:
        await h.aio.close()
    finally:
        opener.cancel()
        h.gate.set()
    assert path.read_bytes()[4096:] == b"kept" * 1024


async def test_a_read_only_host_file_has_no_queue_and_refuses_writes(tmp_path):
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(4096))
    h = AsyncHost(PosixFile(path, writable=False, lock=False))
    try:
        assert h.writeback is None
        with pytest.raises(HostIOError):
            await h.pwrite(0, b"x")
        await h.fdatasync()
    finally:
        await h.close()


# -- after the close -----------------------------------------------------------------------------------------
async def test_a_closed_disk_is_not_kept_alive_by_the_idle_io_workers(tmp_path):
    """The worker threads for reads and structure I/O serve every disk of the process: once a disk is closed,
    none of them may still hold its host file, buffers or engine (a daemon closes one of its disks; a test
    process opens thousands)."""
    path = tmp_path / "disk.vhdx"
    create_image(path, ImageSpec(8 << 20, block_size=1 << 20))
    hosts: weakref.WeakSet = weakref.WeakSet()

    def in_memory(p, writable):  # never in the page cache: every payload read goes to a worker thread
        host = MemoryFile(Path(p).read_bytes(), path=p, writable=writable)
        hosts.add(host)
        return host

    disk = await AsyncDisk.open(path, host_factory=in_memory)
    for block in range(8):  # new blocks: the flush journals them in a worker
        await disk.write(block << 20, b"w" * 4096)
    await disk.flush()
    async with trio.open_nursery() as nursery:  # reads at once, spread over the workers
        for block in range(8):
            nursery.start_soon(disk.read, block << 20, 4096)
    await disk.close()
    del disk
    gc.collect()
    assert not list(hosts), "an idle worker thread still holds the closed disk's host file"
