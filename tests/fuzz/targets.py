"""The fuzz targets: plain ``def target(data: bytes) -> None``, so atheris (tests/fuzz/run.py) and the
corpus replay (tests/fuzz/test_corpora.py) call the very same code.

Each target raises on a broken invariant and returns quietly otherwise; what every target checks is in
tests/fuzz/guards.py (only VhdxError escapes, read-only never writes, bounded time and memory).
"""

from __future__ import annotations

from collections.abc import Callable

from vhdxfs.engine import Disk, check_image
from vhdxfs.engine.image import VhdxFile

from .cases import case, snapshot
from .control_target import control
from .guards import refused
from .nbd_target import nbd
from .repair_target import repair
from .structures import locator

LOG_SEEDS = ("dirty", "dirty4k", "dirtychild", "ours", "child")


def open_image(data: bytes) -> None:
    """Strict and lenient loaders, then a read-only Disk reading here and there.

    Beyond "no other error": an image the strict loader accepts, the lenient one accepts too and finds no
    bad BAT entry in; an image a strict VhdxFile accepts, Disk opens and reads (a child with its chain)."""
    c = case(data)
    factory = c.factory()
    strict = lenient = None
    with refused():
        strict = VhdxFile.open(c.path, read_only=True, host_factory=factory)
        strict.close()
    with refused():
        lenient = VhdxFile.open(c.path, read_only=True, lenient=True, host_factory=factory)
        lenient.close()
    if strict is not None:
        assert lenient is not None and not lenient.bad_entries, "strict open accepted what lenient refuses"
    with refused():
        with Disk.open(c.path, read_only=True, host_factory=factory) as disk:
            snapshot(disk)


def log_replay(data: bytes) -> None:
    """Log replay both ways: in memory (a read-only open) and into the file (a writable open).

    Invariant: when the read-only open succeeds, the writable open of the same bytes succeeds, reads the
    same, and leaves a file whose log is empty and which reads the same again after closing."""
    c = case(data, LOG_SEEDS)
    in_memory = None
    with refused():
        with Disk.open(c.path, read_only=True, host_factory=c.factory()) as disk:
            in_memory = snapshot(disk)
    path = c.write_work_file()
    written = None
    with refused() as errors:
        with Disk.open(path) as disk:
            written = snapshot(disk)
    if in_memory is not None:
        assert written == in_memory, f"writable replay reads differently (or failed: {errors})"
    if written is None:
        return
    again = VhdxFile.open(path, read_only=True)
    again.close()
    assert again.header.log_is_empty, "a writable open and close left a dirty log"
    with Disk.open(path, read_only=True) as disk:
        assert snapshot(disk) == written, "the replayed file reads differently after close"


def check(data: bytes) -> None:
    """``vhdxfs check``: a report or a VhdxError; an image it calls clean opens and reads.

    Runs on the in-memory host that fails on any write (guards.ReadOnlyMemory), so a check that so much as
    tries to change the image, or opens it writable, fails here."""
    c = case(data)
    factory = c.factory()
    report = None
    with refused():
        report = check_image(c.path, host_factory=factory)
    if report is None:
        return
    assert report["status"] in ("clean", "inconsistent")
    if report["status"] == "clean":
        with Disk.open(c.path, read_only=True, host_factory=factory) as disk:
            snapshot(disk)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "open": open_image,
    "log": log_replay,
    "check": check,
    "repair": repair,
    "locator": locator,
    "nbd": nbd,
    "control": control,
}
