"""`vhdxfs compact`: all-zero blocks stop taking space; the contents stay the same for QEMU too."""

from __future__ import annotations

import os

from tests.conftest import need_tools
from tests.helpers import qemu_check_clean, run, vhdxfs

MiB = 1 << 20


def test_zero_blocks_give_their_space_back_and_contents_stay(tmp_path):
    need_tools("qemu-img", "qemu-io")
    image = tmp_path / "c.vhdx"
    assert run("qemu-img", "create", "-f", "vhdx", "-o", "block_size=1M", image, "64M").returncode == 0
    cmds = ["-c", "write -P 0x33 0 4M", "-c", "write -z 1M 2M", "-c", "write -P 0 10M 3M",
            "-c", "write -P 0x44 20M 512"]
    assert run("qemu-io", "-f", "vhdx", *cmds, image).returncode == 0
    before = tmp_path / "before.raw"
    assert run("qemu-img", "convert", "-O", "raw", image, before).returncode == 0
    used = image.stat().st_blocks * 512
    result = vhdxfs("compact", image)
    assert result.returncode == 0, result.stderr
    assert "given back" in result.stdout
    assert image.stat().st_blocks * 512 <= used - 3 * MiB  # the 3 all-zero blocks at 10M
    qemu_check_clean(image)
    compare = run("qemu-img", "compare", "-f", "raw", "-F", "vhdx", before, image)
    assert compare.returncode == 0, compare.stdout
    assert vhdxfs("check", image).returncode == 0


def test_compacting_a_child_keeps_its_zeros_from_showing_the_parent(tmp_path):
    base, child = tmp_path / "base.vhdx", tmp_path / "child.avhdx"
    assert vhdxfs("create", base, "--size", "16M", "--block-size", "1M").returncode == 0
    raw = tmp_path / "ones.raw"
    raw.write_bytes(b"\x01" * (16 * MiB))
    base.unlink()
    assert vhdxfs("convert", raw, base, "--block-size", "1M").returncode == 0
    assert vhdxfs("create", child, "--parent", base, "--block-size", "1M").returncode == 0
    import trio

    from vhdxfs.engine.disk import VirtualDisk

    async def zero_a_block():
        async with await VirtualDisk.open(child) as disk:
            await disk.write(2 * MiB, bytes(MiB))

    trio.run(zero_a_block)
    assert vhdxfs("compact", child).returncode == 0
    merged = tmp_path / "merged.raw"
    assert vhdxfs("convert", child, merged).returncode == 0
    data = merged.read_bytes()
    assert data[2 * MiB:3 * MiB] == bytes(MiB) and data[:2 * MiB] == b"\x01" * (2 * MiB)
    assert os.path.getsize(merged) == 16 * MiB
