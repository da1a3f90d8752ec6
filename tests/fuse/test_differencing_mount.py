"""A mounted differencing child shows the merged view and keeps every write to itself."""

from __future__ import annotations

import os
import random

from tests.helpers import make_image, need_root_fuse, need_tools, qemu_check_clean, run, sha256, vhdxfs

MiB = 1 << 20
SIZE = 48 * MiB


def test_random_writes_through_a_mounted_child_match_a_model(tmp_path, mnt):
    need_tools("qemu-img", "qemu-io")
    base = tmp_path / "base.vhdx"
    assert run("qemu-img", "create", "-f", "vhdx", "-o", "block_size=1M", base, "48M").returncode == 0
    assert run("qemu-io", "-f", "vhdx", "-c", "write -P 0x61 0 30M", base).returncode == 0
    model = bytearray(b"\x61" * (30 * MiB) + bytes(SIZE - 30 * MiB))
    digest = sha256(base)
    child = tmp_path / "snap.avhdx"
    assert vhdxfs("create", child, "--parent", base).returncode == 0
    mnt.mount(child)
    raw = mnt.raw("snap.raw")
    rnd = random.Random(4)
    fd = os.open(raw, os.O_RDWR)
    try:
        assert os.pread(fd, SIZE, 0) == bytes(model)
        for _ in range(120):
            off = rnd.randrange(SIZE)
            n = min(rnd.randrange(512, 5 * MiB), SIZE - off)  # unaligned to sectors, blocks and chunks
            data = rnd.randbytes(n)
            assert os.pwrite(fd, data, off) == n
            model[off:off + n] = data
            probe = rnd.randrange(SIZE)
            m = min(rnd.randrange(1, 2 * MiB), SIZE - probe)
            assert os.pread(fd, m, probe) == bytes(model[probe:probe + m])
        os.fsync(fd)
    finally:
        os.close(fd)
    mnt.umount()
    assert sha256(base) == digest  # the parent is never written
    qemu_check_clean(base)
    assert vhdxfs("check", child).returncode == 0
    merged = tmp_path / "merged.raw"
    assert vhdxfs("convert", child, merged).returncode == 0
    assert merged.read_bytes() == bytes(model)
    info = vhdxfs("info", child).stdout
    assert f"parent 1: {base}" in info


def test_libvhdi_reads_our_chain_as_we_do(tmp_path):
    need_root_fuse()
    need_tools("vhdimount")
    base = make_image(tmp_path / "base.vhdx", 16 * MiB, block_size=1 * MiB)
    mid, top = tmp_path / "mid.avhdx", tmp_path / "top.avhdx"
    import trio

    from vhdxfs.engine.aio import AsyncDisk

    async def write(path, offset, data):
        async with await AsyncDisk.open(path) as disk:
            await disk.write(offset, data)

    trio.run(write, base, 0, b"B" * (8 * MiB))
    assert vhdxfs("create", mid, "--parent", base).returncode == 0
    trio.run(write, mid, 3 * MiB + 512, os.urandom(5 * MiB))
    assert vhdxfs("create", top, "--parent", mid).returncode == 0
    trio.run(write, top, 7 * MiB - 4096, os.urandom(2 * MiB + 1024))
    ours = tmp_path / "ours.raw"
    assert vhdxfs("convert", top, ours).returncode == 0
    point = tmp_path / "vhdi"
    point.mkdir()
    result = run("vhdimount", top, point)
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        layers = sorted(point.iterdir())
        assert len(layers) == 3  # libvhdi shows each layer, the top last
        assert layers[-1].read_bytes() == ours.read_bytes()
    finally:
        run("fusermount3", "-u", point)
