"""Host I/O errors: a full host filesystem gives ENOSPC and a consistent image; EIO surfaces as EIO."""

from __future__ import annotations

import errno
import os

import pytest

from tests.helpers import make_image, run
from vhdxfs.engine import Kind, PosixFile
from vhdxfs.engine.aio import AsyncDisk
from vhdxfs.errors import HostIOError
from vhdxfs.tools.check import check_image

MiB = 1 << 20


async def test_a_full_host_disk_gives_enospc_and_keeps_the_image_consistent(small_fs):
    image = make_image(small_fs / "d.vhdx", 256 * MiB, block_size=1 * MiB)
    async with await AsyncDisk.open(image) as disk:
        await disk.write(0, b"\x42" * MiB)
        await disk.flush()
        with pytest.raises(HostIOError) as exc:
            for i in range(1, 256):
                await disk.write(i * MiB, os.urandom(MiB))
        assert exc.value.errno == errno.ENOSPC
        # Reads go on, and what was flushed is intact.
        assert await disk.read(0, MiB) == b"\x42" * MiB
        try:
            await disk.flush()
        except HostIOError as flush_exc:
            assert flush_exc.errno == errno.ENOSPC
    assert check_image(str(image))["status"] == "clean"
    result = run("qemu-img", "check", image)
    assert result.returncode == 0, result.stdout + result.stderr
    async with await AsyncDisk.open(image, read_only=True) as disk:
        assert await disk.read(0, MiB) == b"\x42" * MiB


class FailingReads(PosixFile):
    """A host file whose payload reads fail with EIO, as a dying disk's would (nothing is in its cache)."""

    fail_from = 1 << 62

    def read_cached(self, offset: int, view: memoryview | bytearray) -> bool:
        return False

    def pread_into(self, offset: int, view: memoryview) -> None:
        if offset >= self.fail_from:
            raise HostIOError(os.strerror(errno.EIO), path=self.path, errno=errno.EIO)
        super().pread_into(offset, view)


async def test_eio_from_the_host_surfaces_as_eio(tmp_path):
    image = make_image(tmp_path / "d.vhdx", 32 * MiB, block_size=1 * MiB)
    async with await AsyncDisk.open(image) as disk:
        await disk.write(5 * MiB, b"z" * 4096)
        [extent] = await disk.extents(5 * MiB, 4096)
        assert extent.kind == Kind.DATA
        payload_at = extent.file_offset
    FailingReads.fail_from = payload_at
    disk = await AsyncDisk.open(image, read_only=True, host_factory=FailingReads)
    try:
        with pytest.raises(HostIOError) as exc:
            await disk.read(5 * MiB, 4096)
        assert exc.value.errno == errno.EIO and str(image) in str(exc.value)
        assert await disk.read(0, 4096) == bytes(4096)  # unallocated space needs no host read
    finally:
        await disk.close()
