"""vhdxfs.open: a virtual disk behaves as a binary file object, with the mount's locking and durability."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import tarfile
import threading

import pytest

import vhdxfs
from tests.helpers import make_image
from vhdxfs.errors import ImageLockedError, NotVhdxError, UsageError, VhdxError

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    return make_image(tmp_path / "d.vhdx", 8 * MiB, block_size=MiB)


def test_it_is_a_raw_io_object_that_io_can_buffer(image):
    with vhdxfs.open(image, "r+b") as raw:
        assert isinstance(raw, io.RawIOBase) and raw.readable() and raw.writable() and raw.seekable()
        buffered = io.BufferedRandom(raw)
        buffered.seek(MiB - 3)
        buffered.write(b"across a block boundary")
        buffered.flush()
        buffered.seek(MiB - 3)
        assert buffered.read(23) == b"across a block boundary"
    with vhdxfs.open(image) as disk:  # "rb" by default
        disk.seek(MiB - 3)
        assert disk.read(6) == b"across"


def test_seek_tell_and_the_end_of_the_disk(image):
    with vhdxfs.open(image, "r+b") as disk:
        assert disk.seek(0, os.SEEK_END) == disk.size == 8 * MiB
        assert disk.read(10) == b""  # at the end: nothing more, like a file
        disk.seek(-4, os.SEEK_END)
        assert disk.write(b"0123456789") == 4  # cut short at the end, like a block device
        assert disk.tell() == 8 * MiB
        with pytest.raises(OSError) as exc:
            disk.write(b"x")
        assert exc.value.errno == errno.ENOSPC
        disk.seek(-4, os.SEEK_CUR)
        assert disk.read() == b"0123"
        with pytest.raises(OSError):
            disk.seek(-1)
        with pytest.raises(io.UnsupportedOperation):
            disk.truncate(0)
        with pytest.raises(io.UnsupportedOperation):
            disk.fileno()


def test_copyfileobj_and_tarfile_read_it_like_a_file(image, tmp_path):
    data = os.urandom(3 * MiB)
    with vhdxfs.open(image, "r+b") as disk:
        disk.write(data)
    out = tmp_path / "copy.raw"
    with vhdxfs.open(image) as disk, open(out, "wb") as f:
        shutil.copyfileobj(disk, f)
    assert out.read_bytes()[:3 * MiB] == data and out.stat().st_size == 8 * MiB
    archive = tmp_path / "disk.tar"
    with vhdxfs.open(image) as disk, tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("disk.raw")
        info.size = disk.size
        tar.addfile(info, disk)
    with tarfile.open(archive) as tar:
        assert hashlib.sha256(tar.extractfile("disk.raw").read()).digest() == hashlib.sha256(out.read_bytes()).digest()


def test_read_only_opens_refuse_writes_and_share_the_image(image):
    with vhdxfs.open(image, "rb") as a, vhdxfs.open(image, "rb") as b:
        assert not a.writable()
        with pytest.raises(io.UnsupportedOperation):
            a.write(b"x")
        assert a.read(16) == b.read(16)


def test_a_second_writer_is_refused_with_ebusy(image):
    with vhdxfs.open(image, "r+b"):
        with pytest.raises(ImageLockedError) as exc:
            vhdxfs.open(image, "r+b")
        assert exc.value.errno == errno.EBUSY and str(image) in str(exc.value)


def test_errors_are_the_documented_hierarchy(tmp_path, image):
    not_vhdx = tmp_path / "plain.vhdx"
    not_vhdx.write_bytes(bytes(2 * MiB))
    with pytest.raises(NotVhdxError) as exc:
        vhdxfs.open(not_vhdx)
    assert exc.value.errno and str(not_vhdx) in str(exc.value)
    with pytest.raises(VhdxError):
        vhdxfs.open(tmp_path / "missing.vhdx")
    with pytest.raises(UsageError):
        vhdxfs.open(image, "w")
    with pytest.raises(UsageError):
        vhdxfs.create(tmp_path / "x.vhdx")  # no size
    with pytest.raises(VhdxError):
        vhdxfs.create(image, size="1G")  # exists


def test_flushed_writes_survive_a_process_that_dies(image):
    """A child process writes, flushes, writes more, and is killed: the flushed write is there."""
    import subprocess
    import sys

    code = ("import os, vhdxfs\n"
            f"d = vhdxfs.open({str(image)!r}, 'r+b')\n"
            "d.write(b'flushed' * 100); d.flush()\n"
            "print('ok', flush=True); os._exit(9)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
    with vhdxfs.open(image) as disk:
        assert disk.read(700) == b"flushed" * 100


def test_threads_may_share_one_file_object(image):
    with vhdxfs.open(image, "r+b") as disk:
        def work(k: int) -> None:
            for i in range(50):  # threads share the position, so each writes at its own offsets
                assert disk.pwrite((k * 50 + i) * 4096, bytes([k + 1]) * 4096) == 4096

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    with vhdxfs.open(image) as disk:
        for k in range(4):
            assert disk.pread(k * 50 * 4096, 50 * 4096) == bytes([k + 1]) * (50 * 4096)


def test_create_makes_dynamic_fixed_and_child_images(tmp_path):
    vhdxfs.create(tmp_path / "dyn.vhdx", size="16M", block_size="1M")
    vhdxfs.create(tmp_path / "fix.vhdx", size=16 * MiB, fixed=True)
    vhdxfs.create(tmp_path / "kid.avhdx", parent=tmp_path / "dyn.vhdx")
    with vhdxfs.open(tmp_path / "kid.avhdx") as kid:
        assert kid.size == 16 * MiB and [p.name for p in kid.chain()] == ["kid.avhdx", "dyn.vhdx"]
    with vhdxfs.open(tmp_path / "fix.vhdx") as fixed:
        assert {e.kind.name for e in fixed.extents()} == {"DATA"}


def test_importing_vhdxfs_loads_neither_trio_nor_the_engine():
    import subprocess
    import sys

    code = "import sys, vhdxfs; print(sorted(m for m in ('trio', 'vhdxfs.engine', 'vhdxfs.api') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


async def test_the_async_form_reads_and_writes(image):
    async with await vhdxfs.open_async(image, "r+b") as disk:
        assert await disk.pwrite(MiB, b"async") == 5
        await disk.flush()
        await disk.seek(MiB)
        assert await disk.read(5) == b"async"
        assert [e.kind.name for e in await disk.extents(MiB, 4096)] == ["DATA"]
    with vhdxfs.open(image) as disk:
        disk.seek(MiB)
        assert disk.read(5) == b"async"


def test_zipfile_reads_an_archive_stored_at_the_end_of_the_disk(image):
    """zipfile finds an archive by its end record, at the end of the file: like a zip on a block device."""
    import zipfile

    stored = io.BytesIO()
    with zipfile.ZipFile(stored, "w") as archive:
        archive.writestr("hello.txt", "inside a virtual disk")
    with vhdxfs.open(image, "r+b") as disk:
        disk.pwrite(disk.size - len(stored.getvalue()), stored.getvalue())
    with vhdxfs.open(image) as raw, io.BufferedReader(raw) as disk, zipfile.ZipFile(disk) as archive:
        assert archive.read("hello.txt") == b"inside a virtual disk"
