"""Logs we write are replayed correctly by QEMU, and by us in memory (read-only) or in the file."""

from __future__ import annotations

import trio

from tests.helpers import make_dirty_image, need_tools, qemu_check_clean, run, sha256
from vhdxfs.engine.aio import AsyncDisk
from vhdxfs.engine.image import VhdxFile

MiB = 1 << 20


def test_read_only_open_replays_in_memory_and_writes_nothing(tmp_path):
    image = make_dirty_image(tmp_path / "d.vhdx", 16 * MiB, 3 * MiB, b"\x77" * MiB)
    digest = sha256(image)
    in_place = VhdxFile.open(image, read_only=True)
    assert in_place.replayed_entries >= 1 and in_place.bat.payload(3)[0] == 6  # as the replayed log says
    in_place.close()

    async def read() -> bytes:
        async with await AsyncDisk.open(image, read_only=True) as disk:
            return bytes(await disk.read(3 * MiB, MiB))

    assert trio.run(read) == b"\x77" * MiB
    assert sha256(image) == digest


def test_writable_open_replays_into_the_file_and_clears_the_log(tmp_path):
    image = make_dirty_image(tmp_path / "d.vhdx", 16 * MiB, 0, b"\x78" * (2 * MiB))

    async def read() -> bytes:
        async with await AsyncDisk.open(image) as disk:
            return bytes(await disk.read(0, 2 * MiB))

    assert trio.run(read) == b"\x78" * (2 * MiB)
    image_file = VhdxFile.open(image, read_only=True)
    assert image_file.header.log_is_empty and image_file.overlay is None
    image_file.close()


def test_qemu_replays_our_log(tmp_path):
    need_tools("qemu-io", "qemu-img")
    image = make_dirty_image(tmp_path / "q.vhdx", 16 * MiB, MiB, b"\x79" * MiB)
    result = run("qemu-io", "-f", "vhdx", "-c", f"read -P 0x79 {MiB} {MiB}", image)  # rw open: QEMU replays
    assert result.returncode == 0 and "Pattern verification failed" not in result.stdout, result.stdout
    qemu_check_clean(image)
