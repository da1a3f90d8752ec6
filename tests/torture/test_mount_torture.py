"""Torture through the FUSE mount: processes race on the same payload blocks of a mounted raw file.

Each process is a client of tests/torture/model.py's layout: it writes and reads its own sectors of shared
blocks with O_DIRECT (buffers aligned by mmap), punches holes in its own ranges (libc fallocate) and
fsyncs; one of them, owning some blocks alone, punches them with util-linux ``fallocate --punch-hole``.
Every process checks its own reads as it goes, and that what others hold reads as data of its own place
or zeros. Afterwards the raw file must read as the model, SEEK_HOLE must find holes only where the model
has zeros, and once unmounted the image must check clean (and read the same through the engine).

The operations of every process are drawn up front by the test, so the final contents are known exactly
whatever order the processes ran in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fuse import conftest as fuse_fixtures
from tests.helpers import make_image, need_root_fuse, need_tools, qemu_check_clean, seed_dirs
from tests.torture.model import CELL, Patterns, make_layout, pick_op
from vhdxfs.engine import Disk, check_image, create_child

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02

mnt = fuse_fixtures.mnt  # the real-mount fixture of tests/fuse (root and /dev/fuse, or fail under CI)


# -- the client processes --------------------------------------------------------------------------------------
def _punch_libc(fd: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _check_cells(patterns: Patterns, offset: int, got: bytes) -> None:
    for pos in range(0, len(got), CELL):
        cell = got[pos:pos + CELL]
        found = patterns.origin(cell)
        if any(cell) and (found is None or found[0] != offset + pos):
            raise AssertionError(f"offset {offset + pos} holds [{patterns.describe(offset + pos, cell)}]")


def client_main(spec_path: str, me: str) -> None:
    """One client process: its operations in order, each own read checked against what it wrote."""
    spec = json.loads(Path(spec_path).read_text())
    me_ = int(me)
    patterns = Patterns(spec["size"], spec["salt"])
    mine = bytearray(Path(spec["initial"]).read_bytes())  # correct for this client's own bytes
    rnd = random.Random(f"{spec['seed']}:{me_}")
    ops = spec["ops"][me_]
    buf = mmap.mmap(-1, max([n for _k, _o, n, _g in ops] + [1]) + mmap.PAGESIZE)  # page-aligned for O_DIRECT
    view = memoryview(buf)
    fd = os.open(spec["raw"], os.O_RDWR | os.O_DIRECT)
    try:
        for kind, offset, n, gen in ops:
            if rnd.random() < 0.3:
                time.sleep(rnd.random() / 1000)
            if kind == "write":
                data = patterns.data(offset, n, gen)
                view[:n] = data
                assert os.pwritev(fd, [view[:n]], offset) == n
                mine[offset:offset + n] = data
            elif kind in ("read", "foreign-read"):
                assert os.preadv(fd, [view[:n]], offset) == n
                if kind == "read" and view[:n] != mine[offset:offset + n]:
                    _check_cells(patterns, offset, bytes(view[:n]))
                    raise AssertionError(f"client {me_}: own read of {offset}+{n} is not what it wrote")
                if kind == "foreign-read":
                    _check_cells(patterns, offset, bytes(view[:n]))
            elif kind == "extents":  # a hole SEEK_HOLE finds in own bytes must be zeros there
                try:
                    hole = os.lseek(fd, offset, os.SEEK_HOLE)
                    data_at = os.lseek(fd, hole, os.SEEK_DATA) if hole < offset + n else hole
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    hole = data_at = spec["size"]
                if hole < offset + n:
                    assert not any(mine[hole:min(data_at, offset + n)]), f"client {me_}: a hole over own data"
            elif kind == "flush":
                os.fsync(fd)
            elif me_ == spec["puncher"]:
                result = subprocess.run(["fallocate", "--punch-hole", "--offset", str(offset), "--length", str(n),
                                         spec["raw"]], capture_output=True, text=True)
                assert result.returncode == 0, result.stderr
                os.fsync(fd)
                mine[offset:offset + n] = bytes(n)
            else:
                _punch_libc(fd, offset, n)
                mine[offset:offset + n] = bytes(n)
    finally:
        os.close(fd)


# -- the test ----------------------------------------------------------------------------------------------------
def plan(tmp_path: Path, seed: int, *, sector: int, differencing: bool, clients: int, steps: int):
    """The image, the layout, every client's operations, and the contents they leave."""
    rnd = random.Random(f"mount:{seed}:{sector}:{differencing}")
    size = 6 * MiB + rnd.choice([0, MiB // 2])
    patterns = Patterns(size, rnd.getrandbits(64))
    layout = make_layout(rnd, size, MiB, sector, clients)
    base = make_image(tmp_path / "base.vhdx", size, block_size=MiB, logical_sector_size=sector)
    initial = bytearray(size)
    target = base
    if differencing:
        initial[:] = patterns.data(0, size, 1)
        with Disk.open(base) as disk:
            disk.write(0, initial)
        target = tmp_path / "child.avhdx"
        create_child(target, base, block_size=MiB)
    sole = [sum(k == f"sole:{c}" for k in layout.kinds) for c in range(clients)]
    puncher = sole.index(max(sole))
    gens = iter(range(2, 1 << 40))
    ops: list[list[tuple]] = []
    final = bytearray(initial)
    for me in range(clients):
        mine = []
        for _ in range(steps):
            op = pick_op(rnd, layout, me, gens, unaligned=False)
            if op.kind == "write":
                final[op.offset:op.offset + op.length] = patterns.data(op.offset, op.length, op.gen)
            elif op.kind in ("discard", "zeroes", "zeroes-unmap"):
                final[op.offset:op.offset + op.length] = bytes(op.length)
            mine.append((op.kind, op.offset, op.length, op.gen))
        ops.append(mine)
    return target, base if differencing else None, size, patterns, layout, puncher, bytes(initial), ops, bytes(final)


def run_clients(tmp_path: Path, raw: Path, seed: int, size: int, patterns: Patterns, puncher: int,
                initial: bytes, ops) -> None:
    (tmp_path / "initial.bin").write_bytes(initial)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"raw": str(raw), "size": size, "salt": patterns.salt, "seed": seed,
                                "puncher": puncher, "initial": str(tmp_path / "initial.bin"), "ops": ops}))
    code = "import sys; from tests.torture.test_mount_torture import client_main; client_main(*sys.argv[1:])"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(spec), str(me)], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True) for me in range(len(ops))]
    failures = []
    for me, proc in enumerate(procs):
        _out, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            failures.append(f"client {me} exited {proc.returncode}:\n{err[-3000:]}")
    assert not failures, "\n".join(failures)


def mount_torture(tmp_path: Path, mnt, seed: int, *, sector: int, differencing: bool, clients: int,
                  steps: int) -> dict:
    target, parent, size, patterns, layout, puncher, initial, ops, final = plan(
        tmp_path, seed, sector=sector, differencing=differencing, clients=clients, steps=steps)
    mnt.mount(target)
    raw = mnt.raw(target.with_suffix(".raw").name)
    run_clients(tmp_path, raw, seed, size, patterns, puncher, initial, ops)
    fd = os.open(raw, os.O_RDONLY)
    try:
        got = os.pread(fd, size, 0)
        if got != final:
            first = next(i for i in range(size) if got[i] != final[i]) // CELL * CELL
            raise AssertionError(f"the raw file differs from the model at {first}: "
                                 f"[{patterns.describe(first, got[first:first + 64])}] for "
                                 f"[{patterns.describe(first, final[first:first + 64])}]")
        pos = 0
        while pos < size:  # SEEK_HOLE/SEEK_DATA: holes only where the model has zeros
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            if hole >= size:
                break
            try:
                pos = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                pos = size
            assert not any(final[hole:pos]), f"SEEK_HOLE found a hole at {hole} over data"
    finally:
        os.close(fd)
    mnt.umount()
    report = check_image(target)
    assert report["status"] == "clean" and not report["errors"] and not report["warnings"], report
    if parent is None and sector == 512:
        qemu_check_clean(target)
    with Disk.open(target, read_only=True) as disk:
        assert bytes(disk.read(0, size)) == final, "the image does not hold what the mount showed"
    counts: dict = {"clients": clients, "unmapped blocks punched": 0}
    for mine in ops:
        for kind, offset, n, _gen in mine:
            counts[kind] = counts.get(kind, 0) + 1
            if kind in ("discard", "zeroes", "zeroes-unmap") and n >= MiB:
                counts["unmapped blocks punched"] += sum(
                    1 for b in range(-(-offset // MiB), size // MiB + 1) if min((b + 1) * MiB, size) <= offset + n)
    return counts


@pytest.mark.parametrize("sector,differencing", [(512, False), (4096, True)], ids=["dynamic-512", "differencing-4096"])
def test_processes_racing_on_shared_blocks_through_the_mount(tmp_path, mnt, sector, differencing):
    need_root_fuse()
    need_tools("fallocate", "qemu-img")
    started = time.monotonic()
    counts = mount_torture(tmp_path, mnt, 1, sector=sector, differencing=differencing, clients=6, steps=80)
    print(f"mount torture: {counts} in {time.monotonic() - started:.1f} s")
    assert counts["unmapped blocks punched"] > 0


@pytest.mark.stress
@pytest.mark.parametrize("sector,differencing", [(512, False), (4096, False), (512, True), (4096, True)],
                         ids=["dynamic-512", "dynamic-4096", "differencing-512", "differencing-4096"])
def test_mount_torture_stress(tmp_path, mnt, sector, differencing):
    need_root_fuse()
    need_tools("fallocate", "qemu-img")
    started = time.monotonic()
    for seed, work in seed_dirs(tmp_path, range(100, 100 + int(os.environ.get("VHDXFS_TORTURE_MOUNTS", 10)))):
        counts = mount_torture(work, mnt, seed, sector=sector, differencing=differencing, clients=4 + seed % 9,
                               steps=120)
        print(f"mount torture seed {seed}: {counts}")
    print(f"mount torture (stress): {time.monotonic() - started:.1f} s")
