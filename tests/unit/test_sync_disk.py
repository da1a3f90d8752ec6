"""The synchronous engine (vhdxfs.engine.Disk): the same steps as AsyncDisk, driven in the caller's thread.

What a front end relies on: reads return what was written, write_zeroes with and without unmapping, extents
through a chain with the layer that answers, thread safety, and no trio.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading

import pytest

from tests.helpers import make_image, need_tools, on_disk, qemu_check_clean
from vhdxfs.engine import Disk, Kind, MemoryFile, create_child
from vhdxfs.errors import OutOfRangeError, ReadOnlyError
from vhdxfs.format.bat import PayloadState

MiB = 1 << 20


def random_steps(disk: Disk, model: bytearray, rnd: random.Random, steps: int) -> None:
    for i in range(steps):
        off = rnd.randrange(len(model))
        n = min(rnd.choice([1, 512, 4096, 70000, 3 * MiB]), len(model) - off)
        what = rnd.random()
        if what < 0.1:
            disk.discard(off, n)
            model[off:off + n] = bytes(n)
        elif what < 0.2:
            disk.write_zeroes(off, n, unmap=rnd.random() < 0.5)
            model[off:off + n] = bytes(n)
        else:
            data = rnd.randbytes(n)
            disk.write(off, data)
            model[off:off + n] = data
        if i % 23 == 0:
            disk.flush()
        probe = rnd.randrange(len(model))
        m = min(rnd.randrange(1, 2 * MiB), len(model) - probe)
        assert disk.read(probe, m) == model[probe:probe + m]


@pytest.mark.parametrize("disk_type,sector", [("dynamic", 512), ("dynamic", 4096), ("fixed", 512)])
def test_random_io_matches_a_model_and_qemu_finds_the_image_clean(tmp_path, disk_type, sector):
    size = 24 * MiB
    path = make_image(tmp_path / "d.vhdx", size, disk_type=disk_type, block_size=MiB, logical_sector_size=sector)
    model = bytearray(size)
    rnd = random.Random(f"sync{disk_type}{sector}")
    with Disk.open(path) as disk:
        random_steps(disk, model, rnd, 120)
    with Disk.open(path, read_only=True) as disk:
        assert disk.read(0, size) == model
        with pytest.raises(ReadOnlyError):
            disk.write(0, b"x")
    if sector == 512:
        need_tools("qemu-img")
        qemu_check_clean(path)


def test_a_differencing_chain_matches_a_model(tmp_path):
    size = 8 * MiB
    base = make_image(tmp_path / "base.vhdx", size, block_size=MiB)
    model = bytearray(size)
    rnd = random.Random("chain")
    with Disk.open(base) as disk:
        random_steps(disk, model, rnd, 30)
    child = tmp_path / "child.avhdx"
    create_child(child, base, block_size=MiB)
    with Disk.open(child) as disk:
        random_steps(disk, model, rnd, 80)
        assert disk.chain() == [child, base]
    with Disk.open(child, read_only=True) as disk:
        assert disk.read(0, size) == model


def test_write_zeroes_keeps_blocks_unless_asked_to_unmap(tmp_path):
    path = make_image(tmp_path / "d.vhdx", 8 * MiB, block_size=MiB)
    with Disk.open(path) as disk:
        disk.write(0, b"\xaa" * (4 * MiB))
        disk.write_zeroes(0, MiB)
        disk.write_zeroes(MiB, MiB, unmap=True)
        disk.discard(2 * MiB, MiB)
        disk.write_zeroes(3 * MiB + 512, 512, unmap=True)  # not a whole block: zeros written, block kept
        assert disk.read(0, 4 * MiB) == bytes(3 * MiB) + b"\xaa" * 512 + bytes(512) + b"\xaa" * (MiB - 1024)
        assert [e.kind for e in disk.extents(0, 4 * MiB)] == [Kind.DATA, Kind.ZERO, Kind.DATA]
        assert disk.extents(4 * MiB, MiB)[0].kind == Kind.HOLE
        disk.flush()
        states = [on_disk(path).bat.payload(b)[0] for b in range(4)]
    assert states == [PayloadState.FULLY_PRESENT, PayloadState.ZERO, PayloadState.ZERO, PayloadState.FULLY_PRESENT]


def test_write_zeroes_in_a_child_hides_the_parent(tmp_path):
    base = make_image(tmp_path / "base.vhdx", 4 * MiB, block_size=MiB)
    with Disk.open(base) as disk:
        disk.write(0, b"p" * (4 * MiB))
    child = tmp_path / "child.avhdx"
    create_child(child, base, block_size=MiB)
    with Disk.open(child) as disk:
        disk.write_zeroes(0, MiB)  # keeps nothing of the parent, unmap or not
        disk.write_zeroes(MiB, MiB, unmap=True)
        disk.write_zeroes(2 * MiB + 4096, 4096)
        assert disk.read(0, 2 * MiB) == bytes(2 * MiB)
        assert disk.read(2 * MiB, 12288) == b"p" * 4096 + bytes(4096) + b"p" * 4096


def test_extents_name_the_layer_that_holds_each_range(tmp_path):
    base = make_image(tmp_path / "base.vhdx", 4 * MiB, block_size=MiB)
    with Disk.open(base) as disk:
        disk.write(0, b"b" * MiB)
    child = tmp_path / "child.avhdx"
    create_child(child, base, block_size=MiB)
    with Disk.open(child) as disk:
        disk.write(4096, b"c" * 4096)
        extents = [(e.offset, e.length, e.kind, e.layer, e.depth) for e in disk.extents()]
    assert extents == [
        (0, 4096, Kind.DATA, base, 1),
        (4096, 4096, Kind.DATA, child, 0),
        (8192, MiB - 8192, Kind.DATA, base, 1),
        (MiB, 3 * MiB, Kind.HOLE, base, 1),
    ]


def test_threads_may_share_one_disk(tmp_path):
    path = make_image(tmp_path / "d.vhdx", 16 * MiB, block_size=MiB)
    with Disk.open(path) as disk:
        def worker(k: int) -> None:
            for i in range(40):
                disk.write((k * 40 + i) * 65536, bytes([k + 1]) * 65536)
                disk.flush()

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    with Disk.open(path, read_only=True) as disk:
        for k in range(4):
            assert disk.read(k * 40 * 65536, 40 * 65536) == bytes([k + 1]) * (40 * 65536)


def test_a_memory_file_is_a_host_like_any_other(tmp_path):
    path = make_image(tmp_path / "d.vhdx", 4 * MiB, block_size=MiB)
    memory = MemoryFile(path.read_bytes(), path=path)
    with Disk.open(path, host_factory=lambda p, writable: memory) as disk:
        disk.write(MiB - 2, b"spans")
        with pytest.raises(OutOfRangeError):
            disk.read(4 * MiB - 1, 2)
    path.write_bytes(memory.data)
    with Disk.open(path, read_only=True) as disk:
        assert disk.read(MiB - 2, 5) == b"spans"


def test_the_synchronous_engine_does_not_import_trio(tmp_path):
    path = make_image(tmp_path / "d.vhdx", 4 * MiB)
    code = ("import sys; from vhdxfs.engine import Disk\n"
            f"with Disk.open({str(path)!r}) as d: d.write(0, b'x'); d.flush(); d.extents()\n"
            "print('trio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
