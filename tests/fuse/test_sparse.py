"""The mounted raw file is sparse like a host file: SEEK_DATA/SEEK_HOLE find the holes (the lseek patch in
packaging/patch_pyfuse3.py) and st_blocks counts only what holds data, so cp, tar -S and qemu-img copy
sparse and fast."""

from __future__ import annotations

import os
import subprocess
import time

import pyfuse3

import vhdxfs
from tests.helpers import make_image, need_tools, run

MiB, GiB = 1 << 20, 1 << 30


def write_sparse(image, places: list[int], length: int = MiB) -> dict[int, bytes]:
    written = {}
    with vhdxfs.open(image, "r+b") as disk:
        for offset in places:
            data = os.urandom(length)
            disk.pwrite(offset, data)
            written[offset] = data
    return written


def test_the_build_has_the_lseek_handler():
    assert getattr(pyfuse3, "LSEEK_SUPPORTED", False), "pyfuse3 was built without packaging/patch_pyfuse3.py"


def test_seek_data_and_seek_hole_follow_the_allocation(tmp_path, mnt):
    image = make_image(tmp_path / "s.vhdx", 256 * MiB, block_size=MiB)
    write_sparse(image, [10 * MiB, 100 * MiB])
    mnt.mount(image)
    fd = os.open(mnt.raw("s.raw"), os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 10 * MiB
        assert os.lseek(fd, 10 * MiB, os.SEEK_HOLE) == 11 * MiB
        assert os.lseek(fd, 11 * MiB, os.SEEK_DATA) == 100 * MiB
        assert os.lseek(fd, 100 * MiB + 5, os.SEEK_DATA) == 100 * MiB + 5  # inside data: stays
        assert os.lseek(fd, 101 * MiB, os.SEEK_HOLE) == 101 * MiB
        try:
            os.lseek(fd, 101 * MiB, os.SEEK_DATA)
            raise AssertionError("SEEK_DATA past the last data must fail with ENXIO")
        except OSError as exc:
            assert exc.errno == 6  # ENXIO
        st = os.fstat(fd)
        assert st.st_size == 256 * MiB and st.st_blocks * 512 == 2 * MiB
    finally:
        os.close(fd)
    mnt.umount()


def test_cp_copies_a_big_mostly_empty_disk_sparse_and_fast(tmp_path, mnt):
    """The product requirement: a 64 GiB raw file holding 10 MiB copies in under 5 s, sparse."""
    image = make_image(tmp_path / "big.vhdx", 64 * GiB)
    written = write_sparse(image, [i * 6 * GiB + i * MiB for i in range(10)])
    mnt.mount(image)
    copy = tmp_path / "copy.raw"
    started = time.monotonic()
    result = run("cp", "--sparse=always", mnt.raw("big.raw"), copy)
    took = time.monotonic() - started
    mnt.umount()
    assert result.returncode == 0, result.stderr
    print(f"cp --sparse=always of 64 GiB holding 10 MiB: {took:.2f} s")
    assert took < 5, f"the copy took {took:.1f} s (required: under 5 s)"
    assert copy.stat().st_size == 64 * GiB and copy.stat().st_blocks * 512 < 256 * MiB
    with open(copy, "rb") as f:
        for offset, data in written.items():
            f.seek(offset)
            assert f.read(len(data)) == data


def test_qemu_img_convert_and_tar_see_the_holes(tmp_path, mnt):
    need_tools("qemu-img", "tar")
    image = make_image(tmp_path / "t.vhdx", 4 * GiB)
    written = write_sparse(image, [GiB])
    mnt.mount(image)
    out = tmp_path / "conv.raw"
    assert run("qemu-img", "convert", "-f", "raw", "-O", "raw", mnt.raw("t.raw"), out).returncode == 0
    archive = tmp_path / "t.tar"
    assert subprocess.run(["tar", "-S", "-cf", archive, "-C", mnt.mountpoint, "t.raw"]).returncode == 0
    mnt.umount()
    assert out.stat().st_blocks * 512 < 64 * MiB
    with open(out, "rb") as f:
        f.seek(GiB)
        assert f.read(MiB) == written[GiB]
    assert archive.stat().st_size < 64 * MiB  # tar -S stored the holes as holes
