"""`vhdxfs convert`: the output reads exactly as the source (a model, and qemu-img's own conversion, say
what that is), takes as little space as qemu-img's, is removed when the conversion fails, and every error
names the file it is about, a full host disk included."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from tests.helpers import make_dirty_image, need_tools, on_disk, qemu_check_clean, run, sha256, vhdxfs
from vhdxfs.engine import convert
from vhdxfs.engine.ops import mover
from vhdxfs.engine.ops.hostfile import fd_data_ranges

KiB, MiB = 1 << 10, 1 << 20


def sparse_raw(path: Path, size: int, seed: int) -> bytes:
    """A sparse raw file: runs of data (with zero stretches inside, aligned or not), holes between them,
    and runs of written zeros; returns its contents."""
    rnd = random.Random(seed)
    model = bytearray(size)
    for _ in range(12):
        off = rnd.randrange(0, size - 2 * MiB) // 512 * 512 + rnd.choice([0, 0, 100])
        n = rnd.randrange(1, 2 * MiB)
        model[off:off + n] = rnd.randbytes(n)
        for _ in range(3):
            z, m = off + rnd.randrange(n), rnd.choice([700, 4096, 8192, 100_000])
            model[z:z + m] = bytes(len(model[z:z + m]))
    assert len(model) == size
    with open(path, "wb") as f:
        f.truncate(size)
        for pos in range(0, size, 64 * KiB):
            piece = model[pos:pos + 64 * KiB]
            if any(piece) or rnd.random() < 0.1:  # some all-zero pieces are written zeros, not holes
                f.seek(pos)
                f.write(piece)
    return bytes(model)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def near(ours: int, theirs: int) -> bool:
    """Within 5% (at least 256 KiB) of qemu-img's allocation."""
    return abs(ours - theirs) <= max(theirs * 0.05, 256 * KiB)


def payload_allocated(img: Path) -> int:
    """Bytes of an image file's payload the host holds (past its BAT region; create_image reserves the log,
    metadata and BAT regions with fallocate, where QEMU leaves them sparse: 2-3 MiB whatever the data)."""
    image = on_disk(img)
    start = image.bat.region_offset + image.geometry.bat_region_length
    with open(img, "rb") as f:
        return sum(n for _at, n in fd_data_ranges(f.fileno(), start, os.fstat(f.fileno()).st_size - start))


def test_raw_to_vhdx_to_raw_reads_as_the_source_and_takes_the_space_qemu_img_takes(tmp_path):
    need_tools("qemu-img")
    raw = tmp_path / "a.raw"
    model = sparse_raw(raw, 48 * MiB + 512, 1)
    img, back = tmp_path / "a.vhdx", tmp_path / "back.raw"
    assert vhdxfs("convert", raw, img).returncode == 0
    assert vhdxfs("convert", img, back).returncode == 0
    assert back.read_bytes() == model
    qemu_check_clean(img)
    q_img, q_back = tmp_path / "q.vhdx", tmp_path / "q.raw"
    assert run("qemu-img", "convert", "-O", "vhdx", raw, q_img).returncode == 0
    assert run("qemu-img", "convert", "-O", "raw", q_img, q_back).returncode == 0
    assert q_back.read_bytes() == model
    assert run("qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", img, q_img).returncode == 0
    assert near(allocated(back), allocated(q_back)), (allocated(back), allocated(q_back))
    assert near(payload_allocated(img), payload_allocated(q_img)), (payload_allocated(img), payload_allocated(q_img))
    ours_from_qemu = tmp_path / "from-q.raw"
    assert vhdxfs("convert", q_img, ours_from_qemu).returncode == 0  # QEMU's blocks: holes inside
    assert ours_from_qemu.read_bytes() == model
    assert near(allocated(ours_from_qemu), allocated(q_back))


@pytest.mark.parametrize("sparse, expect", [("0", "all"), ("64K", "64K"), ("4K", "4K")])
def test_the_sparse_size_says_which_zeros_are_not_written(tmp_path, sparse, expect):
    raw = tmp_path / "z.raw"
    data = bytearray(b"d" * (1 * MiB))
    data[8 * KiB:12 * KiB] = bytes(4 * KiB)  # one aligned 4 KiB zero piece
    data[128 * KiB:256 * KiB] = bytes(128 * KiB)  # two aligned 64 KiB zero pieces
    raw.write_bytes(data)
    out = tmp_path / "z.out"
    result = vhdxfs("convert", "-S", sparse, raw, out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == data
    skipped = {"all": 0, "64K": 128 * KiB, "4K": 132 * KiB}[expect]
    assert allocated(out) == MiB - skipped


def test_vhdx_to_vhdx_flattens_a_chain_and_keeps_a_fixed_type(tmp_path):
    need_tools("qemu-img", "qemu-io")
    base, child = tmp_path / "base.vhdx", tmp_path / "child.avhdx"
    assert run("qemu-img", "create", "-f", "vhdx", base, "32M").returncode == 0
    assert run("qemu-io", "-f", "vhdx", "-c", "write -P 0x11 0 8M", "-c", "write -P 0x12 20M 3M", base).returncode == 0
    assert vhdxfs("create", child, "--parent", base).returncode == 0
    model = bytearray(32 * MiB)
    model[:8 * MiB] = b"\x11" * (8 * MiB)
    model[20 * MiB:23 * MiB] = b"\x12" * (3 * MiB)
    convert(child, tmp_path / "unused.raw")  # an empty child reads as its parent
    assert (tmp_path / "unused.raw").read_bytes() == model
    flat = tmp_path / "flat.vhdx"
    result = vhdxfs("convert", child, flat, "--type", "fixed", "--block-size", "1M")
    assert result.returncode == 0, result.stderr
    qemu_check_clean(flat)
    back = tmp_path / "flat.raw"
    assert run("qemu-img", "convert", "-O", "raw", flat, back).returncode == 0
    assert back.read_bytes() == model
    assert "fixed" in vhdxfs("info", flat).stdout.lower()


def test_a_dirty_source_converts_as_its_log_says(tmp_path):
    data = random.Random(4).randbytes(3 * MiB)
    img = make_dirty_image(tmp_path / "d.vhdx", 16 * MiB, 5 * MiB, data)
    digest = sha256(img)
    out = tmp_path / "d.raw"
    convert(img, out)
    assert out.read_bytes() == bytes(5 * MiB) + data + bytes(8 * MiB)
    assert sha256(img) == digest  # read-only: the log is replayed in memory, never into the file


def test_progress_counts_the_whole_disk(tmp_path):
    raw = tmp_path / "p.raw"
    sparse_raw(raw, 20 * MiB, 2)
    seen: list[tuple[int, str, int]] = []

    class Bar:
        def __init__(self, total, description):
            self.total, self.description, self.done = total, description, 0

        def update(self, n):
            assert n > 0
            self.done += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            seen.append((self.total, self.description, self.done))

    result = convert(raw, tmp_path / "p.vhdx", progress=Bar)
    assert seen == [(20 * MiB, "converting p.raw", 20 * MiB)] and result.size == 20 * MiB


def test_a_failed_conversion_removes_the_output_and_stops_its_reader(tmp_path, monkeypatch):
    raw = tmp_path / "f.raw"
    raw.write_bytes(b"f" * (16 * MiB))
    monkeypatch.setattr(mover, "DEPTH", 2)
    for dst in ("f.vhdx", "f.out"):
        calls = []

        def fail(offset, view, calls=calls):
            calls.append(offset)
            if len(calls) == 2:
                raise KeyboardInterrupt
        target = "vhdxfs.engine.ops.convert.Disk.write" if dst.endswith(".vhdx") else \
            "vhdxfs.engine.ops.convert.RawTarget.write"
        monkeypatch.setattr(target, lambda self, offset, view: fail(offset, view))
        with pytest.raises(KeyboardInterrupt):
            convert(raw, tmp_path / dst)
        assert not (tmp_path / dst).exists()
        assert not [t for t in threading.enumerate() if t.name == "vhdxfs-read-ahead"]
        monkeypatch.undo()


def test_errors_name_the_file(tmp_path):
    raw = tmp_path / "e.raw"
    raw.write_bytes(b"e" * 4096)
    exists = tmp_path / "there.vhdx"
    exists.write_bytes(b"")
    cases = [
        ((tmp_path / "missing.raw", tmp_path / "x.vhdx"), f"vhdxfs: {tmp_path / 'missing.raw'}: "),
        ((tmp_path / "missing.vhdx", tmp_path / "x.raw"), f"vhdxfs: {tmp_path / 'missing.vhdx'}: "),
        ((raw, exists), f"vhdxfs: {exists}: already exists"),
        ((raw, tmp_path / "no" / "dir.raw"), f"vhdxfs: {tmp_path / 'no' / 'dir.raw'}: No such file"),
        ((raw, tmp_path / "no" / "dir.vhdx"), f"vhdxfs: {tmp_path / 'no' / 'dir.vhdx'}: No such file"),
        ((raw, tmp_path / "bs.vhdx", "--block-size", "3M"), f"vhdxfs: {tmp_path / 'bs.vhdx'}: --block-size: "),
        ((raw, tmp_path / "s.vhdx", "-S", "1000"), "vhdxfs: --sparse-size: "),
    ]
    for args, start in cases:
        result = vhdxfs("convert", *args)
        assert result.returncode == 1 and result.stderr.startswith(start), (args, result.stderr)
    (tmp_path / "empty.raw").write_bytes(b"")
    result = vhdxfs("convert", tmp_path / "empty.raw", tmp_path / "empty.vhdx")
    assert result.stderr.startswith(f"vhdxfs: {tmp_path / 'empty.raw'}: ") and not (tmp_path / "empty.vhdx").exists()


@pytest.mark.parametrize("src_kind, dst_name", [("raw", "disk.vhdx"), ("vhdx", "disk.raw"), ("raw", "disk.raw")])
def test_a_full_host_disk_names_the_output_and_leaves_nothing(tmp_path, small_fs, src_kind, dst_name):
    raw = tmp_path / "big.raw"
    raw.write_bytes(random.Random(8).randbytes(64 * MiB))  # more than the 48 MiB file system holds
    src = raw
    if src_kind == "vhdx":
        src = tmp_path / "big.vhdx"
        assert vhdxfs("convert", raw, src).returncode == 0
    dst = small_fs / dst_name
    result = vhdxfs("convert", src, dst)
    assert result.returncode == 1
    assert result.stderr == f"vhdxfs: {dst}: No space left on device\n"
    assert not dst.exists()
    assert os.listdir(small_fs) == ["lost+found"]


def test_the_bar_shows_on_a_terminal_only(tmp_path, monkeypatch, capsys):
    import sys
    from contextlib import contextmanager

    from vhdxfs import cli
    from vhdxfs.tools import progress as bars

    raw = tmp_path / "t.raw"
    raw.write_bytes(b"t" * MiB)
    drawn = []

    @contextmanager
    def progress(total, description):
        drawn.append((total, description))
        yield bars.tqdm(disable=True)

    monkeypatch.setattr(bars, "progress", progress)
    for tty, out in ((False, "a.vhdx"), (True, "b.vhdx")):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        assert cli.main(["convert", str(raw), str(tmp_path / out)]) == 0
    assert drawn == [(MiB, "converting t.raw")]
