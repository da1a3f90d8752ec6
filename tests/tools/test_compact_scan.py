"""`vhdxfs compact` on QEMU's images, whose blocks are sparse on the host: the zero scan finds the all-zero
blocks whatever the file holds as holes, and moving a block from the tail keeps its holes (the file's
allocation only shrinks). The contents stay what qemu-img reads."""

from __future__ import annotations

import os
import re

from tests.helpers import need_tools, qemu_check_clean, run, vhdxfs

MiB = 1 << 20


def test_compacting_a_qemu_image_with_sparse_blocks_only_gives_space_back(tmp_path):
    need_tools("qemu-img", "qemu-io")
    image = tmp_path / "q.vhdx"
    assert run("qemu-img", "create", "-f", "vhdx", "-o", "block_size=1M", image, "32M").returncode == 0
    cmds = []
    for block in range(12):
        at = block * MiB
        if block in (2, 5):
            cmds += ["-c", f"write -P 0 {at} 1M"]  # written zeros: all-zero blocks, low in the file
        elif block == 7:
            cmds += ["-c", f"write -P 0 {at} 4k", "-c", f"write -P 0 {at + 512 * 1024} 4k"]  # zeros and holes
        else:
            cmds += ["-c", f"write -P {block + 1} {at + 8192} 64k"]  # a little data: the rest of the block a hole
    assert run("qemu-io", "-f", "vhdx", *cmds, image).returncode == 0
    before = tmp_path / "before.raw"
    assert run("qemu-img", "convert", "-O", "raw", image, before).returncode == 0
    used = os.stat(image).st_blocks * 512
    result = vhdxfs("compact", image)
    assert result.returncode == 0, result.stderr
    assert "(3 all-zero blocks)" in result.stdout
    moved = int(re.search(r"(\d+) MiB moved", result.stdout).group(1))
    assert moved >= 3, result.stdout  # at least the three last blocks, into the three holes
    after = os.stat(image).st_blocks * 512
    assert after <= used - 2 * MiB, (used, after)  # the written zeros went; no hole of a moved block filled
    qemu_check_clean(image)
    compare = run("qemu-img", "compare", "-f", "raw", "-F", "vhdx", before, image)
    assert compare.returncode == 0, compare.stdout
