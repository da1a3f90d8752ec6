"""AsyncDisk reads back what was written, at any offset and length, across flushes and reopens."""

from __future__ import annotations

import errno
import random

import pytest

from tests.helpers import make_image, on_disk, probe_read, random_step, sha256
from vhdxfs.engine import Kind
from vhdxfs.engine.aio import AsyncDisk
from vhdxfs.errors import ImageLockedError, OutOfRangeError, ReadOnlyError
from vhdxfs.format.constants import MiB


@pytest.mark.parametrize("disk_type,block_size,sector", [
    ("dynamic", 1 * MiB, 512), ("dynamic", 2 * MiB, 4096), ("fixed", 1 * MiB, 512), ("dynamic", 32 * MiB, 512)])
async def test_random_io_matches_a_model(tmp_path, disk_type, block_size, sector):
    size = 40 * MiB
    path = make_image(tmp_path / "d.vhdx", size, disk_type=disk_type, block_size=block_size,
                      logical_sector_size=sector)
    model = bytearray(size)
    rnd = random.Random(f"{disk_type}{block_size}{sector}")
    disk = await AsyncDisk.open(path)
    for step in range(150):
        await random_step(disk, model, rnd, rnd.choice([1, 511, 512, 4096, 70000, 3 * MiB]))
        if step % 37 == 0:
            await disk.flush()
        if step % 50 == 49:
            await disk.close()
            disk = await AsyncDisk.open(path)
        await probe_read(disk, model, rnd, 2 * MiB)
    await disk.close()
    async with await AsyncDisk.open(path, read_only=True) as disk:
        assert await disk.read(0, size) == bytes(model)


async def test_unwritten_space_reads_zero_and_takes_no_room(tmp_path):
    path = make_image(tmp_path / "d.vhdx", 64 * MiB)
    before = path.stat().st_size
    async with await AsyncDisk.open(path) as disk:
        assert await disk.read(0, 64 * MiB) == bytes(64 * MiB)
    assert path.stat().st_size == before


async def test_discarded_block_reads_zero_and_its_space_is_punched(tmp_path):
    path = make_image(tmp_path / "d.vhdx", 64 * MiB, block_size=8 * MiB)
    async with await AsyncDisk.open(path) as disk:
        await disk.write(8 * MiB, b"\xab" * (8 * MiB))
        await disk.flush()
        used = path.stat().st_blocks
        await disk.discard(8 * MiB, 8 * MiB)
        assert [e.kind for e in await disk.extents(8 * MiB, 8 * MiB)] == [Kind.ZERO]
        assert await disk.read(8 * MiB, 8 * MiB) == bytes(8 * MiB)
        assert path.stat().st_blocks <= used - (8 * MiB) // 512
        # Space freed by a committed discard is reused, and never shows its old contents.
        await disk.flush()
        await disk.write(40 * MiB, b"\x01" * 512)
        assert await disk.read(40 * MiB, 8 * MiB) == b"\x01" * 512 + bytes(8 * MiB - 512)


async def test_partial_discard_zeroes_only_the_range(tmp_path):
    path = make_image(tmp_path / "d.vhdx", 16 * MiB, block_size=1 * MiB)
    async with await AsyncDisk.open(path) as disk:
        await disk.write(0, b"\xff" * (3 * MiB))
        await disk.discard(1000, 2 * MiB)
        data = await disk.read(0, 3 * MiB)
    assert data == b"\xff" * 1000 + bytes(2 * MiB) + b"\xff" * (MiB - 1000)


async def test_read_only_open_refuses_writes_and_changes_nothing(tmp_path):
    path = make_image(tmp_path / "d.vhdx", 16 * MiB)
    async with await AsyncDisk.open(path) as disk:
        await disk.write(0, b"x" * 4096)
    digest = sha256(path)
    async with await AsyncDisk.open(path, read_only=True) as disk:
        with pytest.raises(ReadOnlyError) as exc:
            await disk.write(0, b"y")
        assert exc.value.errno == errno.EROFS
        assert await disk.read(0, 4) == b"xxxx"
    assert sha256(path) == digest


async def test_requests_past_the_end_are_refused(tmp_path):
    path = make_image(tmp_path / "d.vhdx", 16 * MiB)
    async with await AsyncDisk.open(path) as disk:
        with pytest.raises(OutOfRangeError):
            await disk.read(16 * MiB - 1, 2)
        with pytest.raises(OutOfRangeError):
            await disk.write(16 * MiB, b"z")


async def test_a_second_writer_is_refused_but_readers_share(tmp_path):
    path = make_image(tmp_path / "d.vhdx", 16 * MiB)
    async with await AsyncDisk.open(path):
        with pytest.raises(ImageLockedError) as exc:
            await AsyncDisk.open(path)
        assert exc.value.errno == errno.EBUSY and str(path) in str(exc.value)
        with pytest.raises(ImageLockedError):
            await AsyncDisk.open(path, read_only=True)
    async with await AsyncDisk.open(path, read_only=True):
        async with await AsyncDisk.open(path, read_only=True):
            with pytest.raises(ImageLockedError):
                await AsyncDisk.open(path)


async def test_clean_close_leaves_an_empty_log_and_new_guids(tmp_path):
    path = make_image(tmp_path / "d.vhdx", 16 * MiB)
    before = on_disk(path)
    async with await AsyncDisk.open(path) as disk:
        await disk.write(0, b"data")
        await disk.flush()
        assert not on_disk(path).header.log_is_empty
    after = on_disk(path)
    assert after.header.log_is_empty
    assert after.header.file_write_guid != before.header.file_write_guid
    assert after.header.data_write_guid != before.header.data_write_guid
