"""A full host filesystem under a mounted image: writes fail with ENOSPC, reads go on, the image stays clean."""

from __future__ import annotations

import errno
import os

import pytest

from tests.helpers import make_image, qemu_check_clean, vhdxfs

MiB = 1 << 20


def test_enospc_reaches_the_fuse_client_and_the_daemon_keeps_serving(small_fs, mnt):
    image = make_image(small_fs / "full.vhdx", 256 * MiB, block_size=1 * MiB)
    mnt.mount(image)
    raw = mnt.raw("full.raw")
    fd = os.open(raw, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x42" * MiB, 0)
        os.fsync(fd)
        with pytest.raises(OSError) as exc:
            for i in range(1, 256):
                os.pwrite(fd, os.urandom(MiB), i * MiB)
            os.fsync(fd)
        assert exc.value.errno == errno.ENOSPC
        assert os.pread(fd, MiB, 0) == b"\x42" * MiB  # reads go on
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    mnt.umount()
    qemu_check_clean(image)
    assert vhdxfs("check", image).returncode == 0
