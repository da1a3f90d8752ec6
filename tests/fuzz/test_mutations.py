"""Hostile and damaged images: only VhdxError comes out, never a hang, a huge allocation or a write.

Hypothesis mutates valid images (ours, QEMU's, one with a dirty log, a differencing child) in every
structure: bytes overwritten, integer fields set to boundary values, and, so mutations get past the
checksums, headers, region tables and log entries re-sealed with a correct CRC afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import struct
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import make_dirty_image, make_image, run
from vhdxfs.engine import Disk, create_child
from vhdxfs.engine.image import VhdxFile
from vhdxfs.errors import VhdxError

MiB = 1 << 20
KiB = 1 << 10
TIME_LIMIT = 10  # seconds per case
MEMORY_LIMIT = 256 * MiB

INTERESTING = [0, 1, 2, 7, 8, 511, 512, 4095, 4096, MiB - 1, MiB, MiB + 1, 2047, 2048, 0x7FFFFFFF, 0xFFFFFFFF,
               1 << 32, 1 << 40, 64 << 40, (64 << 40) + 512, 1 << 62, (1 << 64) - 1]


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: int):
    def on_alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _write(path: Path, offset: int, data: bytes) -> None:
    with Disk.open(path) as disk:
        disk.write(offset, data)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("seeds")
    ours = make_image(d / "ours.vhdx", 8 * MiB, block_size=1 * MiB)
    _write(ours, 3 * MiB - 100, b"\x5a" * (2 * MiB))
    out = {"ours": ours}
    child = d / "child.avhdx"
    create_child(child, ours, block_size=1 * MiB)
    _write(child, MiB + 512, b"\xc3" * 5000)
    out["child"] = child
    if shutil.which("qemu-io"):
        qemu = d / "qemu.vhdx"
        run("qemu-img", "create", "-f", "vhdx", "-o", "block_size=1M", qemu, "8M")
        run("qemu-io", "-f", "vhdx", "-c", "write -P 0x11 0 3M", qemu)
        out["qemu"] = qemu
    dirty = make_dirty_image(d / "dirty.vhdx", 8 * MiB, MiB, b"\x22" * (2 * MiB))
    assert not VhdxFile.open(dirty, read_only=True).header.log_is_empty
    out["dirty"] = dirty
    return out


def regions_of(data: bytes) -> dict[str, tuple[int, int]]:
    """Where each structure of a seed image lies: name -> (offset, length)."""
    spans = {"identifier": (0, 4 * KiB), "header1": (64 * KiB, 4 * KiB), "header2": (128 * KiB, 4 * KiB),
             "region1": (192 * KiB, 64 * KiB), "region2": (256 * KiB, 64 * KiB)}
    log_len, log_off = struct.unpack_from("<IQ", data, 64 * KiB + 68)
    if log_off + 4 * KiB <= len(data):
        spans["log"] = (log_off, min(log_len, 64 * KiB))
    count = struct.unpack_from("<I", data, 192 * KiB + 8)[0]
    for i in range(min(count, 8)):
        guid, off, length, _ = struct.unpack_from("<16sQII", data, 192 * KiB + 16 + 32 * i)
        if off + 4 * KiB <= len(data):
            name = "bat" if guid[:4] == bytes.fromhex("6677c22d") else "metadata"
            spans[name] = (off, min(length, 64 * KiB))
    return spans


def reseal(buf: bytearray, name: str, offset: int) -> None:
    """Give a mutated checksummed structure a valid CRC again."""
    if name.startswith("header"):
        view = memoryview(buf)[offset:offset + 4 * KiB]
        struct.pack_into("<I", buf, offset + 4, 0)
        struct.pack_into("<I", buf, offset + 4, crc32c.crc32c(view))
    elif name.startswith("region"):
        struct.pack_into("<I", buf, offset + 4, 0)
        struct.pack_into("<I", buf, offset + 4, crc32c.crc32c(memoryview(buf)[offset:offset + 64 * KiB]))
    elif name == "log" and buf[offset:offset + 4] == b"loge":
        length = struct.unpack_from("<I", buf, offset + 8)[0]
        if 0 < length <= 1 * MiB and offset + length <= len(buf):
            struct.pack_into("<I", buf, offset + 4, 0)
            struct.pack_into("<I", buf, offset + 4, crc32c.crc32c(memoryview(buf)[offset:offset + length]))


mutation = st.tuples(
    st.sampled_from(["identifier", "header1", "header2", "region1", "region2", "metadata", "bat", "log"]),
    st.integers(0, 64 * KiB - 1),  # where in the structure
    st.one_of(
        st.tuples(st.just("bytes"), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("int"), st.tuples(st.sampled_from([1, 2, 4, 8]), st.sampled_from(INTERESTING))),
    ),
    st.booleans(),  # re-seal the checksum
)


def apply(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    spans = regions_of(data)
    for name, where, (kind, value), seal in mutations:
        if name not in spans:
            continue
        base, length = spans[name]
        at = base + where % length
        if kind == "bytes":
            buf[at:at + len(value)] = value
        else:
            size, number = value
            at -= at % size
            buf[at:at + size] = (number % (1 << (8 * size))).to_bytes(size, "little")
        if seal:
            reseal(buf, name, base)
    return bytes(buf[:len(data)])


def open_and_read(path: Path) -> None:
    """What a user does with an image: open it read-only (a child with its parent chain), read here and
    there, close it. survive() bounds the time it may take."""
    with Disk.open(path, read_only=True) as disk:
        size = disk.size
        for offset in (0, size // 2 // 512 * 512, max(0, size - 4096)):
            disk.read(offset, min(4096, size - offset))
        disk.read(0, min(size, 4 * MiB))


def survive(path: Path) -> bool:
    """Open/read the image: only VhdxError may come out, in bounded time and memory, file untouched.

    Returns whether the image was refused (a VhdxError)."""
    refused = False
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    tracemalloc.start()
    try:
        with time_limit(TIME_LIMIT):
            open_and_read(path)
    except VhdxError as exc:
        assert str(exc) and exc.errno
        refused = True
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"{peak} bytes allocated"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before, "a read-only open wrote to the file"
    return refused


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.sampled_from(["ours", "qemu", "dirty", "child"]), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_images_give_only_vhdx_errors(seeds, tmp_path_factory, seed, mutations):
    source = seeds.get(seed, seeds["ours"])
    target = source.parent / f"m-{source.name}"
    target.write_bytes(apply(source.read_bytes(), mutations))
    survive(target)


@pytest.mark.stress
@settings(max_examples=int(os.environ.get("VHDXFS_FUZZ_EXAMPLES", 100_000)), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(seed=st.sampled_from(["ours", "qemu", "dirty", "child"]), mutations=st.lists(mutation, min_size=1, max_size=6))
def test_mutated_images_stress(seeds, seed, mutations):
    source = seeds.get(seed, seeds["ours"])
    target = source.parent / f"s-{source.name}"
    target.write_bytes(apply(source.read_bytes(), mutations))
    survive(target)


def _field(name: str, offset: int, size: int, value: int, seal: bool = True):
    return [(name, offset, ("int", (size, value)), seal)]


CORPUS = {
    "region entry count past 2047": _field("region1", 8, 4, 2048) + _field("region2", 8, 4, 2048),
    "region entry count max": _field("region1", 8, 4, 0xFFFFFFFF) + _field("region2", 8, 4, 0xFFFFFFFF),
    "BAT region past EOF": _field("region1", 24, 8, 1 << 40) + _field("region1", 56, 8, 1 << 40)
    + _field("region2", 24, 8, 1 << 40) + _field("region2", 56, 8, 1 << 40),
    "regions overlap": _field("region1", 24, 8, 2 * MiB) + _field("region1", 56, 8, 2 * MiB)
    + _field("region2", 24, 8, 2 * MiB) + _field("region2", 56, 8, 2 * MiB),
    "zero-length region": _field("region1", 32, 4, 0) + _field("region2", 32, 4, 0),
    "huge region length": _field("region1", 32, 4, 0xFFF00000) + _field("region2", 32, 4, 0xFFF00000),
    "log past EOF": _field("header1", 72, 8, 1 << 50) + _field("header2", 72, 8, 1 << 50),
    "log length zero": _field("header1", 68, 4, 0) + _field("header2", 68, 4, 0),
    "both headers broken": _field("header1", 0, 4, 0, False) + _field("header2", 0, 4, 0, False),
    "metadata entry count past 2047": [("metadata", 10, ("int", (2, 2048)), False)],
    "metadata item past region": [("metadata", 32 + 16, ("int", (4, 0xFFFFFFF0)), False)],
    "BAT entry past EOF": [("bat", 0, ("int", (8, (1 << 40) | 6)), False)],
    "BAT entry reserved bits": [("bat", 0, ("int", (8, 0x10006 | (3 << 20))), False)],
    "BAT entry into the header": [("bat", 8, ("int", (8, 6)), False)],
    "log entry count huge": [("log", 24, ("int", (4, 0xFFFFFFFF)), True)],
    "log entry length huge": [("log", 8, ("int", (4, 0xFFFFF000)), True)],
    "log tail outside": [("log", 12, ("int", (4, 0x7FFFF000)), True)],
    "log flushed offset past EOF": [("log", 48, ("int", (8, 1 << 45)), True)],
    "log last offset huge": [("log", 56, ("int", (8, 1 << 62)), True)],
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_crafted_edge_cases(seeds, case):
    """Structural damage is refused; a damaged log entry is not an entry (an empty log, as QEMU treats it),
    and a log whose head says the file was once longer than it is marks a truncated file."""
    for seed in ("ours", "dirty"):
        source = seeds.get(seed, seeds["ours"])
        target = source.parent / f"c-{source.name}"
        target.write_bytes(apply(source.read_bytes(), CORPUS[case]))
        refused = survive(target)
        if not case.startswith("log") and seed == "ours":  # in "dirty", replay may rewrite what was damaged
            assert refused, f"{case} on {seed} was accepted"
        elif case == "log flushed offset past EOF" and seed == "dirty":
            assert refused, "a log that says the file was longer must be refused (truncated file)"


def test_the_cli_answers_hostile_images_with_one_line(seeds):
    from tests.helpers import vhdxfs

    source = seeds["ours"]
    target = source.parent / "cli.vhdx"
    target.write_bytes(apply(source.read_bytes(), CORPUS["BAT entry past EOF"]))
    for command in ("info", "check"):
        result = vhdxfs(command, target)
        assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
        assert result.returncode in (1, 2)
