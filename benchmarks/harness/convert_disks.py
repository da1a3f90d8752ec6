"""The disks benchmarks/run-convert works on, built once per run, the same for every contender.

As the issue that asked for the benchmark tried it: a raw disk of SIZE holding DATA bytes of random data in
runs of 1-8 MiB (4 KiB aligned) with holes between them, and that raw file converted to VHDX by qemu-img
(so its blocks, 16 MiB for 4 GiB, are half-written and sparse on the host, as QEMU leaves them):

  src.raw       the sparse raw disk                      (raw -> vhdx; raw -> raw)
  src.vhdx      qemu-img convert -O vhdx src.raw         (vhdx -> raw, vhdx -> vhdx; the chain's base)
  child.avhdx   a vhdxfs child of src.vhdx, CHILD_SHARE of DATA written into it in 4 MiB runs of one
                random pattern (chain -> vhdx, commit)
  base.qcow2 + child.qcow2   the same chain in qcow2, the same writes by qemu-io: qemu-img cannot read a
                VHDX differencing image, so this is its nearest equivalent of flattening a chain
  half.vhdx     DATA/block-size allocated blocks spread over the disk, every other one holding random
                data, the rest written zeros (compact: "allocated blocks half zeros")
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .procs import PYTHON, REPO, MiB, log, run

CHILD_SHARE = 0.1  # of DATA, written into the child
PATTERN = 4 * MiB  # the child's writes: one random pattern, written at several places
SEED = 25


def data_layout(size: int, data: int, rnd: random.Random) -> list[tuple[int, int]]:
    """(offset, length) of runs of 1-8 MiB, 4 KiB aligned, DATA bytes in all, spread over the disk."""
    lengths: list[int] = []
    while sum(lengths) < data:
        lengths.append(min(rnd.randrange(256, 2049) * 4096, data - sum(lengths)))
    hole_total = size - data
    cuts = sorted(rnd.randrange(0, hole_total // 4096 + 1) * 4096 for _ in lengths)
    out, pos, prev = [], 0, 0
    for cut, n in zip(cuts, lengths, strict=True):
        pos += cut - prev
        prev = cut
        out.append((pos, n))
        pos += n
    return out


def make_raw(path: Path, size: int, data: int) -> list[tuple[int, int]]:
    rnd = random.Random(SEED)
    layout = data_layout(size, data, rnd)
    with path.open("wb") as f:
        f.truncate(size)
        for offset, n in layout:
            f.seek(offset)
            f.write(rnd.randbytes(n))
    return layout


WRITE_CHILD = """
import sys
from vhdxfs.engine import Disk
pattern = open(sys.argv[2], 'rb').read()
with Disk.open(sys.argv[1]) as disk:
    for offset in map(int, sys.argv[3:]):
        disk.write(offset, pattern)
"""


def make_chains(work: Path, size: int, data: int, vhdxfs: list[str], env: dict[str, Any]) -> None:
    """child.avhdx over src.vhdx, and child.qcow2 over base.qcow2, with the same writes."""
    rnd = random.Random(SEED + 1)
    pattern = work / "pattern.bin"
    pattern.write_bytes(rnd.randbytes(PATTERN))
    writes = max(1, int(data * CHILD_SHARE) // PATTERN)
    offsets = [rnd.randrange(0, (size - PATTERN) // MiB) * MiB for _ in range(writes)]
    run(*vhdxfs, "create", work / "child.avhdx", "--parent", work / "src.vhdx", **env)
    run(PYTHON, "-c", WRITE_CHILD, work / "child.avhdx", pattern, *offsets, cwd=REPO, timeout=1800)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", work / "src.raw", work / "base.qcow2", timeout=1800)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", work / "child.qcow2")
    cmds = [arg for off in offsets for arg in ("-c", f"write -q -s {pattern} {off} {PATTERN}")]
    run("qemu-io", "-f", "qcow2", *cmds, work / "child.qcow2", timeout=1800)


def make_half(path: Path, size: int, data: int) -> dict[str, int]:
    """half.vhdx by qemu-img and qemu-io; its allocated blocks and block size."""
    run("qemu-img", "create", "-q", "-f", "vhdx", path, str(size))
    bs = 32 * MiB if size > 100 * (1 << 30) else 16 * MiB if size > (1 << 30) else 8 * MiB  # QEMU's default
    blocks = max(2, data // bs)
    step = max(1, (size // bs) // blocks)
    pattern = path.with_suffix(".pattern")
    pattern.write_bytes(random.Random(SEED + 2).randbytes(bs))
    cmds = []
    for i in range(blocks):
        off = i * step * bs
        cmds += ["-c", f"write -q -s {pattern} {off} {bs}" if i % 2 == 0 else f"write -q -P 0 {off} {bs}"]
    run("qemu-io", "-f", "vhdx", *cmds, path, timeout=1800)
    pattern.unlink()
    return {"blocks": blocks, "block_size": bs}


def build(work: Path, size: int, data: int, jobs: list[str], vhdxfs: list[str],
          env: dict[str, Any]) -> dict[str, Any]:
    """The disks the jobs need, in ``work``; what they are, for the report."""
    log(f"building the disks ({size >> 30} GiB, {data / (1 << 30):.1f} GiB of data) in {work}")
    layout = make_raw(work / "src.raw", size, data)
    run("qemu-img", "convert", "-f", "raw", "-O", "vhdx", work / "src.raw", work / "src.vhdx", timeout=1800)
    if {"chain-to-vhdx", "commit"} & set(jobs):
        make_chains(work, size, data, vhdxfs, env)
    half = make_half(work / "half.vhdx", size, data) if "compact" in jobs else {}
    return {"size": size, "data": sum(n for _o, n in layout), "runs": len(layout), "half": half}
