"""Live operations on a running AsyncDisk (vhdxfs/engine/live): checkpoint, merge (inner and active), resize,
status; contents checked against what was written, images against our check and the chain record."""

from __future__ import annotations

import json
import random
import threading

import pytest
import trio

from tests.helpers import make_image
from vhdxfs.engine import Disk, PosixFile, check_image, describe
from vhdxfs.engine.aio import AsyncDisk
from vhdxfs.engine.live import chain_info, chain_top, checkpoint, disk_status, merge, resize
from vhdxfs.errors import ImageLockedError, Reason, VhdxError

MiB = 1 << 20


def fill(rnd: random.Random, n: int) -> bytes:
    return rnd.randbytes(n)


def clean(path) -> None:
    report = check_image(path)
    assert report["status"] == "clean" and not report["errors"], report


async def test_a_checkpoint_freezes_the_top_and_the_disk_writes_into_a_new_child(tmp_path):
    base = make_image(tmp_path / "disk.vhdx", 16 * MiB, block_size=MiB)
    rnd = random.Random(1)
    before, after = fill(rnd, 3 * MiB), fill(rnd, MiB)
    async with await AsyncDisk.open(base) as disk:
        await disk.write(MiB, before)
        top = await checkpoint(disk)
        assert top.parent == tmp_path and top.name.startswith("disk_") and top.suffix == ".avhdx"
        assert disk.chain() == [top, base]
        await disk.write(2 * MiB, after)
        assert bytes(await disk.read(MiB, 3 * MiB)) == before[:MiB] + after + before[2 * MiB:]
        # The frozen base reads as it was when the checkpoint began, with the disk running.
        with Disk.open(base, read_only=True) as frozen:
            assert bytes(frozen.read(MiB, 3 * MiB)) == before
        assert chain_top(base) == top
        with pytest.raises(ImageLockedError):  # the running disk holds its frozen layers shared
            Disk.open(base)
    with pytest.raises(VhdxError) as refused:  # and once it stopped, the chain record keeps writers out
        Disk.open(base)
    assert refused.value.reason == Reason.FROZEN and top.name in str(refused.value)
    assert json.loads((tmp_path / "disk.vhdx.chain").read_text())["layers"] == ["disk.vhdx", top.name]
    clean(top)
    clean(base)
    with Disk.open(top, read_only=True) as reopened:
        assert bytes(reopened.read(MiB, 3 * MiB)) == before[:MiB] + after + before[2 * MiB:]


class HeldSync(PosixFile):
    """A host file whose fdatasync waits while ``hold`` is set: a test acts between a checkpoint's switch and
    its flush of the old top (the only fdatasync of the top once ``hold`` is set in the test below)."""

    hold = threading.Event()
    holding = threading.Event()
    release = threading.Event()

    def fdatasync(self) -> None:
        if self.hold.is_set():
            self.holding.set()
            self.release.wait(60)
        super().fdatasync()


async def test_no_flush_after_a_checkpoint_returns_before_the_old_top_is_durable(tmp_path):
    """The switch does not wait for the old top's data; a flush of the new top must (AsyncDisk.defer_flush)."""
    base = make_image(tmp_path / "disk.vhdx", 16 * MiB, block_size=MiB)
    for event in (HeldSync.hold, HeldSync.holding, HeldSync.release):
        event.clear()
    flush_returned_while_held: list[bool] = []
    async with await AsyncDisk.open(base, host_factory=lambda p, writable: HeldSync(p, writable=writable)) as disk:
        old_top = disk.core
        await disk.write(0, b"a" * MiB)
        await disk.flush()  # its DataWriteGuid set: from here the top's next fdatasync is the checkpoint's flush
        await disk.write(MiB, b"b" * MiB)  # acknowledged, covered by no flush yet
        HeldSync.hold.set()

        async def flush_child() -> None:
            await disk.flush()
            flush_returned_while_held.append(not HeldSync.release.is_set())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(checkpoint, disk)
            await trio.to_thread.run_sync(HeldSync.holding.wait)  # the old top's flush began: after the switch
            assert disk.core is not old_top
            nursery.start_soon(flush_child)
            await trio.sleep(0.5)  # a flush that did not wait for the old top returns in milliseconds
            HeldSync.hold.clear()
            HeldSync.release.set()
    assert flush_returned_while_held == [False]
    with Disk.open(base, read_only=True) as frozen:
        assert bytes(frozen.read(0, 2 * MiB)) == b"a" * MiB + b"b" * MiB


async def test_a_checkpoint_name_is_the_file_name_and_must_be_new(tmp_path):
    base = make_image(tmp_path / "disk.vhdx", 8 * MiB, block_size=MiB)
    async with await AsyncDisk.open(base) as disk:
        top = await checkpoint(disk, "monday")
        assert top.name == "monday.avhdx"
        with pytest.raises(VhdxError) as exists:
            await checkpoint(disk, "monday")
        assert exists.value.reason == Reason.EXISTS
        assert disk.chain() == [top, base]


async def test_merging_an_inner_layer_keeps_every_byte_and_removes_it(tmp_path):
    base = make_image(tmp_path / "disk.vhdx", 16 * MiB, block_size=MiB)
    rnd = random.Random(2)
    model = bytearray(16 * MiB)

    async def put(disk, offset, data):
        await disk.write(offset, data)
        model[offset:offset + len(data)] = data

    async with await AsyncDisk.open(base) as disk:
        await put(disk, 0, fill(rnd, 4 * MiB))
        first = await checkpoint(disk)
        await put(disk, 3 * MiB + 512, fill(rnd, 2 * MiB))
        await disk.discard(8 * MiB, MiB)  # a zeroed block in the inner layer covers the base (zeros there)
        model[8 * MiB:9 * MiB] = bytes(MiB)
        second = await checkpoint(disk)
        await put(disk, 5 * MiB, fill(rnd, MiB))
        result = await merge(disk, first.name)
        assert result.parent == base and not first.exists()
        assert disk.chain() == [second, base]
        assert bytes(await disk.read(0, 16 * MiB)) == model
        await put(disk, 12 * MiB, fill(rnd, 4096))
    assert json.loads((tmp_path / "disk.vhdx.chain").read_text())["layers"] == ["disk.vhdx", second.name]
    clean(second)
    clean(base)
    with Disk.open(second, read_only=True) as reopened:
        assert bytes(reopened.read(0, 16 * MiB)) == model


async def test_merging_the_active_top_while_writes_go_on_keeps_every_byte(tmp_path):
    base = make_image(tmp_path / "disk.vhdx", 32 * MiB, block_size=MiB)
    rnd = random.Random(3)
    model = bytearray(32 * MiB)
    async with await AsyncDisk.open(base) as disk:
        await disk.write(0, bytes(fill(rnd, 8 * MiB)))
        model[:8 * MiB] = (await disk.read(0, 8 * MiB))
        top = await checkpoint(disk)
        for i in range(16):
            data = fill(rnd, 256 * 1024)
            await disk.write(i * MiB + 4096, data)
            model[i * MiB + 4096:i * MiB + 4096 + len(data)] = data

        async def writer():
            for _ in range(200):
                offset = rnd.randrange(0, 32 * MiB // 4096) * 4096
                data = fill(rnd, 4096)
                await disk.write(offset, data)
                model[offset:offset + 4096] = data
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            result = await merge(disk, top)
        assert result.parent == base and not top.exists()
        assert disk.chain() == [base]
        assert bytes(await disk.read(0, 32 * MiB)) == model
        await disk.write(30 * MiB, b"after")
        model[30 * MiB:30 * MiB + 5] = b"after"
    assert not (tmp_path / "disk.vhdx.chain").exists()
    clean(base)
    with Disk.open(base, read_only=True) as reopened:
        assert bytes(reopened.read(0, 32 * MiB)) == model


async def test_a_merge_is_refused_while_a_reader_holds_the_parent(tmp_path):
    base = make_image(tmp_path / "disk.vhdx", 8 * MiB, block_size=MiB)
    async with await AsyncDisk.open(base) as disk:
        await disk.write(0, b"x" * MiB)
        top = await checkpoint(disk)
        await disk.write(MiB, b"y" * MiB)
        with Disk.open(base, read_only=True):  # a backup reading the checkpoint
            with pytest.raises(ImageLockedError):
                await merge(disk, top)
        assert disk.chain() == [top, base]
        assert bytes(await disk.read(0, 2 * MiB)) == b"x" * MiB + b"y" * MiB
        await merge(disk, top)  # once the reader is gone
        assert disk.chain() == [base]


async def test_a_running_disk_grows_and_a_chain_with_checkpoints_does_not(tmp_path):
    base = make_image(tmp_path / "disk.vhdx", 8 * MiB, block_size=MiB)
    async with await AsyncDisk.open(base) as disk:
        await disk.write(7 * MiB, b"z" * MiB)
        result = await resize(disk, 64 * MiB)
        assert (result.old_size, result.new_size, disk.size) == (8 * MiB, 64 * MiB, 64 * MiB)
        await disk.write(60 * MiB, b"w" * MiB)
        assert bytes(await disk.read(7 * MiB, MiB)) == b"z" * MiB
        assert bytes(await disk.read(60 * MiB, MiB)) == b"w" * MiB
        await checkpoint(disk)
        with pytest.raises(VhdxError) as refused:
            await resize(disk, 128 * MiB)
        assert refused.value.reason == Reason.UNSUPPORTED
    assert describe(base)["virtual-size"] == 64 * MiB


async def test_status_reports_the_chain_and_the_io(tmp_path):
    base = make_image(tmp_path / "disk.vhdx", 8 * MiB, block_size=MiB)
    async with await AsyncDisk.open(base) as disk:
        await disk.write(0, b"a" * 8192)
        await disk.read(0, 4096)
        await disk.flush()
        await checkpoint(disk)
        status = disk_status(disk)
        assert [layer["role"] for layer in status["chain"]] == ["top", "frozen"]
        assert status["chain"][1]["allocated-bytes"] == MiB
        assert status["io"]["write"]["requests"] == 1 and status["io"]["write"]["bytes"] == 8192
        assert status["io"]["read"]["requests"] == 1 and status["io"]["flush"]["requests"] == 1
        assert status["operation"] is None and not status["paused"]
        assert [layer["path"] for layer in chain_info(disk)] == [str(p) for p in disk.chain()]


async def test_a_checkpoint_merged_away_at_once_leaves_a_chain_that_opens(tmp_path):
    """An inner layer that holds nothing of its own: its parent takes nothing (its DataWriteGuid stays), and
    the child above must be re-pointed to that one, not to the one a copy would have set."""
    base = make_image(tmp_path / "disk.vhdx", 8 * MiB, block_size=MiB)
    async with await AsyncDisk.open(base) as disk:
        await disk.write(0, b"b" * MiB)
        empty = await checkpoint(disk)
        top = await checkpoint(disk)
        await disk.write(MiB, b"t" * MiB)
        await merge(disk, empty)
        assert disk.chain() == [top, base]
    with Disk.open(top) as reopened:
        assert bytes(reopened.read(0, 2 * MiB)) == b"b" * MiB + b"t" * MiB
