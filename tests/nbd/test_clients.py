"""Real NBD clients against a real `vhdxfs serve`: qemu-img, qemu-io, nbdinfo, nbdcopy, fio and the kernel's
nbd driver read and write the exports, and what they wrote is in the image afterwards, for our own tools and
for QEMU's.

The images: dynamic (1 MiB blocks), fixed, 4096-byte logical sectors, and a differencing child over a parent
that holds data. QEMU opens only VHDX files with 512-byte sectors and no parent, so ``qemu-img check`` judges
those only; ``vhdxfs check`` and ``vhdxfs convert`` judge every kind.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import make_dirty_image, make_image, need_tools, qemu_check_clean, run, sha256, vhdxfs
from vhdxfs.engine import Disk, Kind, create_child

MiB = 1 << 20
GiB = 1 << 30
SIZE = 64 * MiB
KINDS = ["dynamic", "fixed", "4k-sector", "differencing"]
TRANSPORTS = {"unix": False, "tcp": True}
# Every kind of image, over one transport or the other (qemu-io runs the whole matrix).
EVERY_KIND_EITHER_WAY = [
    pytest.param("dynamic", False, id="dynamic-unix"), pytest.param("fixed", True, id="fixed-tcp"),
    pytest.param("4k-sector", False, id="4k-sector-unix"), pytest.param("differencing", True, id="differencing-tcp")]

# What the parent of the differencing image holds: (byte, offset, length).
PARENT_DATA = [(0xAA, 0, 8 * MiB), (0xBB, 40 * MiB, MiB)]

# What the clients write: (qemu-io command, the byte the range then reads as, offset, length).
WRITES = [
    ("write -P 0x11", 0x11, 0, 4096),
    ("write -P 0x22", 0x22, 3 * MiB - 512, 2 * MiB + 1024),  # not 4 KiB aligned, across block boundaries
    ("write -f -P 0x33", 0x33, 10 * MiB, 64 << 10),  # -f: FUA
    ("write -P 0x44", 0x44, 16 * MiB, 4 * MiB),
    ("discard", 0, 16 * MiB, 2 * MiB),
    ("write -z", 0, 19 * MiB, 64 << 10),
    ("discard", 0, 4 * MiB + 4096, 2 * MiB),  # over the parent's data in the differencing image
    ("write -z", 0, 6 * MiB + 8192, MiB),  # likewise
    ("write -P 0x55", 0x55, 40 * MiB + 512, 512),  # a sector inside the parent's second range
    ("write -P 0x66", 0x66, SIZE - 4096, 4096),  # the last page
]
WRITE_COMMANDS = [f"{command} {offset} {length}" for command, _byte, offset, length in WRITES]


# -- images and what they should read as ----------------------------------------------------------------------

def make_kind(tmp_path: Path, kind: str) -> Path:
    if kind == "dynamic":
        return make_image(tmp_path / "dynamic.vhdx", SIZE, block_size=MiB)
    if kind == "fixed":
        return make_image(tmp_path / "fixed.vhdx", SIZE, disk_type="fixed")
    if kind == "4k-sector":
        return make_image(tmp_path / "sector4k.vhdx", SIZE, block_size=MiB, logical_sector_size=4096,
                          physical_sector_size=4096)
    base = make_image(tmp_path / "base.vhdx", SIZE, block_size=MiB)
    with Disk.open(base) as disk:
        for byte, offset, length in PARENT_DATA:
            disk.write(offset, bytes([byte]) * length)
    child = tmp_path / "child.avhdx"
    create_child(child, base)
    return child


def qemu_openable(kind: str) -> bool:
    return kind in ("dynamic", "fixed")


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def image(tmp_path, kind) -> Path:
    return make_kind(tmp_path, kind)


def before_writes(kind: str) -> bytearray:
    model = bytearray(SIZE)
    if kind == "differencing":
        for byte, offset, length in PARENT_DATA:
            model[offset:offset + length] = bytes([byte]) * length
    return model


@functools.cache
def after_writes(kind: str) -> bytes:
    """What the disk reads as once WRITES went through."""
    model = before_writes(kind)
    for _command, byte, offset, length in WRITES:
        model[offset:offset + length] = bytes([byte]) * length
    return bytes(model)


def uniform_runs(model: bytes) -> list[tuple[int, int, int]]:
    """(byte, offset, length) of the runs of one byte the model is made of (its edges are those of the writes)."""
    edges = {0, len(model)}
    for _byte, offset, length in PARENT_DATA:
        edges |= {offset, offset + length}
    for _command, _byte, offset, length in WRITES:
        edges |= {offset, offset + length}
    ordered = sorted(edges)
    runs = []
    for start, end in itertools.pairwise(ordered):
        byte = model[start]
        assert model[start:end] == bytes([byte]) * (end - start)
        runs.append((byte, start, end - start))
    return runs


def read_commands(model: bytes) -> list[str]:
    """qemu-io ``read -P`` commands that check every byte of the disk against the model."""
    return [f"read -P {byte:#04x} {offset} {length}" for byte, offset, length in uniform_runs(model)]


# -- running the clients ---------------------------------------------------------------------------------------

def qemu_io(uri: str, *commands: str, read_only: bool = False):
    args = [arg for command in commands for arg in ("-c", command)]
    return run("qemu-io", *(["-r"] if read_only else []), "-d", "unmap", "-f", "raw", *args, uri)


def succeeded(result) -> bool:
    return result.returncode == 0 and "failed" not in result.stdout + result.stderr


def report(result) -> str:
    return f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def write_through(uri: str) -> None:
    result = qemu_io(uri, *WRITE_COMMANDS)
    assert succeeded(result), report(result)


def nbdinfo_json(*args: str) -> dict | list:
    result = run("nbdinfo", "--json", *args)
    assert result.returncode == 0, report(result)
    return json.loads(result.stdout)


def merged(ranges) -> list[tuple[int, int]]:
    """(offset, length) ranges, adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        elif length:
            out.append((offset, length))
    return out


def allocated_data(path: Path) -> list[tuple[int, int]]:
    """The DATA ranges of the image (through its chain), as the engine sees them."""
    with Disk.open(path, read_only=True) as disk:
        return merged((e.offset, e.length) for e in disk.extents() if e.kind == Kind.DATA)


def write_sparse(path: Path, size: int, chunks: list[tuple[int, bytes]]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in chunks:
            f.seek(offset)
            f.write(data)
    return path


# -- 1. qemu-img and qemu-io -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "tcp"), EVERY_KIND_EITHER_WAY)
def test_qemu_img_info_shows_the_virtual_size(serve, image, tcp):
    with serve(image, tcp=tcp) as server:
        result = run("qemu-img", "info", "--output=json", "-f", "raw", server.uri())
    assert result.returncode == 0, report(result)
    assert json.loads(result.stdout)["virtual-size"] == SIZE


@pytest.mark.parametrize("tcp", TRANSPORTS.values(), ids=TRANSPORTS.keys())
def test_qemu_io_reads_back_its_writes_fua_discards_and_zeroes_on_a_new_connection(serve, image, kind, tcp):
    with serve(image, tcp=tcp) as server:
        write_through(server.uri())
        result = qemu_io(server.uri(), *read_commands(after_writes(kind)))
    assert succeeded(result), report(result)


@pytest.mark.parametrize("kind", ["differencing"])
def test_writes_through_nbd_read_the_same_from_a_fresh_server(serve, image, kind, tmp_path):
    with serve(image) as server:
        write_through(server.uri())
    expected = tmp_path / "expected.raw"
    expected.write_bytes(after_writes(kind))
    with serve(image, tcp=True) as server:
        result = run("qemu-img", "compare", "-f", "raw", "-F", "raw", expected, server.uri())
    assert result.returncode == 0, report(result)


def test_writes_through_nbd_leave_a_clean_image_that_converts_to_them(serve, image, kind, tmp_path):
    with serve(image) as server:
        write_through(server.uri())
    raw = tmp_path / "converted.raw"
    result = vhdxfs("convert", image, raw)
    assert result.returncode == 0, result.stderr
    assert raw.read_bytes() == after_writes(kind)
    check = vhdxfs("check", image)
    assert check.returncode == 0, check.stdout + check.stderr
    if qemu_openable(kind):
        qemu_check_clean(image)


@pytest.mark.parametrize(("kind", "tcp"), EVERY_KIND_EITHER_WAY)
def test_qemu_img_convert_writes_a_raw_file_into_the_export_and_reads_it_back(serve, image, tcp, tmp_path):
    """-n: the export is not assumed zeroed, so the holes of the source must zero the target (over the
    parent's data, in the differencing image)."""
    source = write_sparse(tmp_path / "source.raw", SIZE, [
        (MiB - 512, os.urandom(3 * MiB)), (24 * MiB, os.urandom(4096)), (SIZE - MiB, os.urandom(MiB))])
    back = tmp_path / "back.raw"
    with serve(image, tcp=tcp) as server:
        into = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, server.uri())
        assert into.returncode == 0, report(into)
        out = run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri(), back)
        assert out.returncode == 0, report(out)
    assert back.read_bytes() == source.read_bytes()


def test_qemu_img_compare_over_nbd_reports_a_differing_byte(serve, tmp_path):
    image = make_image(tmp_path / "d.vhdx", SIZE, block_size=MiB)
    reference = write_sparse(tmp_path / "reference.raw", SIZE, [])
    with serve(image) as server:
        assert succeeded(qemu_io(server.uri(), f"write -P 0x01 {33 * MiB + 7} 1"))
        result = run("qemu-img", "compare", "-f", "raw", "-F", "raw", reference, server.uri())
    assert result.returncode == 1, report(result)
    at = re.search(r"mismatch at offset (\d+)", result.stdout)
    assert at and 33 * MiB + 7 - 512 < int(at.group(1)) <= 33 * MiB + 7, report(result)  # its sector


# -- 2. qemu-img map -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dynamic", "fixed", "differencing"])
def test_qemu_img_map_over_nbd_shows_the_image_allocation(serve, image, kind):
    with serve(image) as server:
        write_through(server.uri())
        result = run("qemu-img", "map", "--output=json", "-f", "raw", server.uri())
    assert result.returncode == 0, report(result)
    mapped = merged((e["start"], e["length"]) for e in json.loads(result.stdout) if e["data"])
    assert mapped == allocated_data(image)
    if kind != "fixed":
        assert sum(length for _offset, length in mapped) < SIZE // 2  # the holes really are holes


# -- 3. nbdinfo ------------------------------------------------------------------------------------------------

def test_nbdinfo_lists_every_export_with_its_size(serve, tmp_path):
    first = make_image(tmp_path / "first.vhdx", SIZE)
    second = make_image(tmp_path / "second.vhdx", 32 * MiB, logical_sector_size=4096)
    with serve(first, second) as server:
        listing = nbdinfo_json("--list", server.uri())
    assert {e["export-name"]: e["export-size"] for e in listing["exports"]} == {"first": SIZE, "second": 32 * MiB}


def test_the_default_export_of_a_one_image_server_is_that_image(serve, tmp_path):
    only = make_image(tmp_path / "only.vhdx", SIZE)
    with serve(only) as server:
        info = nbdinfo_json(server.uri(""))
    [export] = info["exports"]
    assert (export["export-name"], export["export-size"]) == ("only", SIZE)


def test_a_two_image_server_has_no_default_export(serve, tmp_path):
    first, second = make_image(tmp_path / "first.vhdx", SIZE), make_image(tmp_path / "second.vhdx", SIZE)
    with serve(first, second) as server:
        result = run("nbdinfo", server.uri(""))
    assert result.returncode != 0, report(result)


def test_nbdinfo_map_shows_data_where_written_and_holes_elsewhere(serve, tmp_path):
    image = make_image(tmp_path / "m.vhdx", SIZE, block_size=MiB)
    with serve(image) as server:
        written = qemu_io(server.uri(), f"write -P 1 {2 * MiB} {2 * MiB}", f"discard {3 * MiB} {MiB}",
                          f"write -P 2 {10 * MiB + 512} 512")
        assert succeeded(written), report(written)
        extents = nbdinfo_json("--map", server.uri())
    data, hole = "data", "hole,zero"
    assert [(e["offset"], e["length"], e["description"]) for e in extents] == [
        (0, 2 * MiB, hole), (2 * MiB, MiB, data), (3 * MiB, 7 * MiB, hole), (10 * MiB, MiB, data),
        (11 * MiB, SIZE - 11 * MiB, hole)]


def test_a_client_that_aborts_the_negotiation_is_not_logged_as_a_server_error(nbd_tools, tmp_path):
    """nbdinfo --list ends with NBD_OPT_ABORT and hangs up: an ordinary goodbye, not a failed connection.
    (A server in the foreground, to read its log whether or not the host has syslog.)"""
    image = make_image(tmp_path / "quiet.vhdx", SIZE)
    sock = tmp_path / "quiet.sock"
    server = subprocess.Popen([sys.executable, "-m", "vhdxfs.cli", "serve", image, "--socket", sock, "--foreground"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={sock}"
        for _ in range(5):
            assert run("nbdinfo", "--list", uri).returncode == 0
    finally:
        server.send_signal(signal.SIGTERM)
        _out, logged = server.communicate(timeout=60)
    assert server.returncode == 0, logged[-3000:]
    assert "ERROR" not in logged and "Traceback" not in logged, logged[-3000:]


# -- 4. nbdcopy ------------------------------------------------------------------------------------------------

def test_nbdcopy_copies_a_mostly_empty_64_gib_export_sparse_and_identical_within_30_s(serve, tmp_path):
    size = 64 * GiB
    chunks = [(i * 6 * GiB + i * 7 * MiB + 4096 * i, os.urandom(MiB)) for i in range(10)]  # 10 MiB in all
    image = make_image(tmp_path / "big.vhdx", size)
    with Disk.open(image) as disk:
        for offset, data in chunks:
            disk.write(offset, data)
    expected = write_sparse(tmp_path / "expected.raw", size, chunks)
    copy = tmp_path / "copy.raw"
    with serve(image) as server:
        start = time.monotonic()
        result = run("nbdcopy", "--connections=4", server.uri(), copy)
        elapsed = time.monotonic() - start
    print(f"nbdcopy --connections=4 of a 64 GiB export holding 10 MiB: {elapsed:.2f} s")
    assert result.returncode == 0, report(result)
    assert elapsed < 30, (f"nbdcopy took {elapsed:.1f} s; the product requires a mostly empty 64 GiB export to "
                          "copy in under 30 s (generous: it takes about a second on 2 cores)")
    assert copy.stat().st_size == size
    assert copy.stat().st_blocks * 512 < 64 * MiB, "the copy is not sparse: the holes were copied as data"
    compare = run("qemu-img", "compare", "-f", "raw", "-F", "raw", expected, copy)
    assert compare.returncode == 0, report(compare)


# -- 5. fio ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", ["4k", "64k"])
def test_fio_random_read_write_from_four_jobs_verifies(serve, tmp_path, block):
    need_tools("fio")
    image = make_image(tmp_path / "fio.vhdx", SIZE, block_size=MiB)
    with serve(image) as server:
        result = run("fio", "--name=nbd", "--ioengine=nbd", f"--uri={server.uri()}", "--rw=randrw", f"--bs={block}",
                     "--numjobs=4", "--iodepth=8", "--size=16M", "--offset_increment=16M",  # a quarter each
                     "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
                     "--group_reporting")
    assert result.returncode == 0, report(result)
    errors = re.findall(r"err=\s*(\d+)", result.stdout)
    assert errors and set(errors) == {"0"}, report(result)
    assert "verify failed" not in result.stdout + result.stderr, report(result)


# -- 6. read-only ----------------------------------------------------------------------------------------------

@pytest.fixture
def written_image(tmp_path) -> Path:
    """A dynamic image holding 0x77 in [1 MiB, 3 MiB)."""
    image = make_image(tmp_path / "ro.vhdx", SIZE, block_size=MiB)
    with Disk.open(image) as disk:
        disk.write(MiB, b"\x77" * 2 * MiB)
    return image


def test_a_read_only_export_serves_reads(serve, written_image):
    with serve(written_image, "-o", "ro") as server:
        result = qemu_io(server.uri(), f"read -P 0x77 {MiB} {2 * MiB}", f"read -P 0 {3 * MiB} {MiB}",
                         read_only=True)
    assert succeeded(result), report(result)


def test_a_read_only_export_is_advertised_read_only(serve, written_image):
    with serve(written_image, "-o", "ro") as server:
        [export] = nbdinfo_json(server.uri())["exports"]
    assert export["is_read_only"] is True
    assert (export["can_trim"], export["can_zero"]) == (False, False)


def test_qemu_io_cannot_write_to_a_read_only_export(serve, written_image):
    """QEMU honours READ_ONLY itself: it refuses to open the export for writing, and a read-only open refuses
    the write, so the server never sees it (the next test sends one anyway)."""
    with serve(written_image, "-o", "ro") as server:
        writable = qemu_io(server.uri(), "write -P 1 0 4096")
        read_only = qemu_io(server.uri(), "write -P 1 0 4096", read_only=True)
    refused = re.compile(r"Permission denied|read-only|Operation not permitted")
    assert writable.returncode != 0 and refused.search(writable.stderr), report(writable)
    assert read_only.returncode != 0 and refused.search(read_only.stderr), report(read_only)


def write_ignoring_read_only(sock: Path, offset: int, data: bytes) -> tuple[int, int]:
    """Send one NBD_CMD_WRITE as a client that ignores the READ_ONLY flag would (every real client checks
    it first): fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies. Returns (transmission flags, the
    write's error). The numbers are the NBD protocol's, written out so the server is judged by the spec."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(sock))
        f = conn.makefile("rwb")
        nbdmagic, ihaveopt, _flags = struct.unpack(">QQH", f.read(18))
        assert (nbdmagic, ihaveopt) == (0x4E42444D41474943, 0x49484156454F5054)
        f.write(struct.pack(">I", 0b11))  # FIXED_NEWSTYLE | NO_ZEROES
        f.write(struct.pack(">QII", ihaveopt, 1, 0))  # NBD_OPT_EXPORT_NAME "" (the default export)
        f.flush()
        _size, flags = struct.unpack(">QH", f.read(10))
        f.write(struct.pack(">IHHQQI", 0x25609513, 0, 1, 7, offset, len(data)) + data)  # NBD_CMD_WRITE, cookie 7
        f.flush()
        magic, error, cookie = struct.unpack(">IIQ", f.read(16))
        assert (magic, cookie) == (0x67446698, 7)
        f.write(struct.pack(">IHHQQI", 0x25609513, 0, 2, 8, 0, 0))  # NBD_CMD_DISC
        f.flush()
        return flags, error


def test_a_write_that_ignores_the_read_only_flag_gets_eperm(serve, written_image):
    with serve(written_image, "-o", "ro") as server:
        flags, error = write_ignoring_read_only(server.socket, MiB, b"\x01" * 4096)
        still = qemu_io(server.uri(), f"read -P 0x77 {MiB} 4096", read_only=True)
    assert flags & 0b10, "NBD_FLAG_READ_ONLY is not set"
    assert error == 1, f"error {error}, not EPERM (1)"
    assert succeeded(still), report(still)


def test_serving_read_only_leaves_the_image_file_unchanged(serve, written_image):
    before = sha256(written_image)
    with serve(written_image, "-o", "ro") as server:
        assert succeeded(qemu_io(server.uri(), f"read 0 {SIZE}", read_only=True))
        qemu_io(server.uri(), "write -P 1 0 4096")
        write_ignoring_read_only(server.socket, 0, b"\x01" * 4096)
        nbdinfo_json("--map", server.uri())
    assert sha256(written_image) == before


# -- 7. locking ------------------------------------------------------------------------------------------------

def serve_elsewhere(image: Path, sock: Path, *options: str):
    """`vhdxfs serve` a second time, on another socket (stopped again at once should it start)."""
    result = vhdxfs("serve", *options, image, "--socket", sock)
    if result.returncode == 0:
        vhdxfs("stop", sock)
    return result


def says_in_use(result) -> bool:
    return result.returncode != 0 and re.search(r"locked|in use", result.stderr) is not None


def test_an_image_served_writable_cannot_be_served_again(serve, written_image, tmp_path):
    with serve(written_image):
        again = serve_elsewhere(written_image, tmp_path / "second.sock")
        read_only = serve_elsewhere(written_image, tmp_path / "third.sock", "-o", "ro")
    assert says_in_use(again), again.stderr
    assert says_in_use(read_only), read_only.stderr


def test_an_image_served_writable_cannot_be_mounted(serve, written_image, tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with serve(written_image):
        result = vhdxfs("mount", written_image, mountpoint)
        if result.returncode == 0:
            vhdxfs("umount", mountpoint)
    assert says_in_use(result), result.stderr


def test_an_image_served_read_only_can_be_served_read_only_again(serve, written_image):
    with serve(written_image, "-o", "ro") as first, serve(written_image, "-o", "ro") as second:
        for server in (first, second):
            result = qemu_io(server.uri(), f"read -P 0x77 {MiB} {2 * MiB}", read_only=True)
            assert succeeded(result), report(result)


def test_an_image_served_read_only_cannot_be_served_writable(serve, written_image, tmp_path):
    with serve(written_image, "-o", "ro"):
        result = serve_elsewhere(written_image, tmp_path / "writer.sock")
    assert says_in_use(result), result.stderr


# -- 8. a dirty log --------------------------------------------------------------------------------------------

DIRTY_OFFSET, DIRTY_DATA = 5 * MiB + 512, b"\x5a" * (3 * MiB)


def test_a_dirty_image_served_read_only_shows_the_write_only_its_log_holds(serve, tmp_path):
    image = make_dirty_image(tmp_path / "dirty.vhdx", SIZE, DIRTY_OFFSET, DIRTY_DATA)
    with serve(image, "-o", "ro") as server:
        result = qemu_io(server.uri(), f"read -P 0x5a {DIRTY_OFFSET} {len(DIRTY_DATA)}",
                         f"read -P 0 0 {DIRTY_OFFSET}", read_only=True)
    assert succeeded(result), report(result)


def test_serving_a_dirty_image_read_only_replays_its_log_in_memory_only(serve, tmp_path):
    image = make_dirty_image(tmp_path / "dirty.vhdx", SIZE, DIRTY_OFFSET, DIRTY_DATA)
    before = sha256(image)
    with serve(image, "-o", "ro") as server:
        assert succeeded(qemu_io(server.uri(), f"read 0 {SIZE}", read_only=True))
    assert sha256(image) == before


# -- 9. the kernel's client ------------------------------------------------------------------------------------

def test_the_kernel_nbd_client_reads_and_writes_the_export(serve, tmp_path):
    """Skipped, even in CI, where the kernel has no nbd driver (containers and many CI kernels do not)."""
    if os.geteuid() != 0:
        pytest.skip("the kernel NBD client needs root")
    if shutil.which("nbd-client") is None:
        pytest.skip("nbd-client is not installed")
    modprobe = run("modprobe", "nbd")
    if modprobe.returncode != 0 or not Path("/dev/nbd0").exists():
        pytest.skip(f"no kernel NBD driver: modprobe nbd: {modprobe.stderr.strip() or 'ok'}, "
                    f"/dev/nbd0 {'exists' if Path('/dev/nbd0').exists() else 'is missing'}")
    if run("nbd-client", "-c", "/dev/nbd0").returncode == 0:
        pytest.skip("/dev/nbd0 is already connected to another server")
    image = make_image(tmp_path / "kernel.vhdx", SIZE, block_size=MiB)
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(4 * MiB))
    back = tmp_path / "back.bin"
    with serve(image) as server:
        attach = run("nbd-client", "-unix", server.socket, "/dev/nbd0", "-N", "kernel")
        assert attach.returncode == 0, report(attach)
        try:
            dd_out = run("dd", f"if={data}", "of=/dev/nbd0", "bs=1M", "seek=7", "oflag=direct", "conv=fsync")
            assert dd_out.returncode == 0, report(dd_out)
            dd_in = run("dd", "if=/dev/nbd0", f"of={back}", "bs=1M", "skip=7", "count=4", "iflag=direct")
            assert dd_in.returncode == 0, report(dd_in)
        finally:
            run("nbd-client", "-d", "/dev/nbd0")
        assert back.read_bytes() == data.read_bytes()
        result = qemu_io(server.uri(), *(f"read -P 0 {offset} {MiB}" for offset in (6 * MiB, 11 * MiB)))
        assert succeeded(result), report(result)
    with Disk.open(image, read_only=True) as disk:
        assert disk.read(7 * MiB, 4 * MiB) == data.read_bytes()
