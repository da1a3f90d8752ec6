"""The ``check --repair`` target, and the precise form of "repair never makes a readable image less
readable" it checks.

Before repair, the lenient loader (the one repair itself uses) says which BAT entries are sound; for
each sound payload block whose state fixes its contents without a parent (FULLY_PRESENT: the bytes at
its file offset, as the replayed log leaves them; ZERO, UNMAPPED, UNDEFINED, and NOT_PRESENT in an image
without a parent: zeros), those contents are the expectation. PARTIALLY_PRESENT and a child's NOT_PRESENT
blocks depend on the sector bitmap and the parent, and are covered by the next rule instead. After a
repair that reports nothing unrepairable:

1. every expected block reads exactly as expected (a repair only ever zeroes blocks it names);
2. if a strict read-only open read the image before, everything it read reads the same after;
3. the result opens strictly and ``check`` calls it clean;
4. a second repair finds nothing to do and changes no byte.

An image reported unrepairable is left byte for byte as it was (repair.py: "not half repaired").
"""

from __future__ import annotations

from vhdxfs.engine import Disk, check_and_repair, repair_image
from vhdxfs.engine.image import VhdxFile
from vhdxfs.errors import VhdxError
from vhdxfs.format.bat import PayloadState

from .cases import Case, case, mark, snapshot, stamp
from .guards import refused

MiB = 1 << 20
MAX_BLOCKS = 16
_ZEROS = {PayloadState.ZERO, PayloadState.UNMAPPED, PayloadState.UNDEFINED}


def expectations(c: Case) -> dict[int, bytes]:
    """Virtual offset -> the bytes there, for every sound block of the lenient view (the first 16, the
    first MiB of each)."""
    try:
        image = VhdxFile.open(c.path, read_only=True, lenient=True, host_factory=c.factory())
    except VhdxError:
        return {}
    try:
        g, out = image.geometry, {}
        for block in range(min(g.data_blocks, MAX_BLOCKS)):
            if g.payload_index(block) in image.bad_entries:
                continue
            state, offset = image.bat.payload(block)
            start = block * g.block_size
            n = min(g.block_size, g.virtual_size - start, MiB)
            if state == PayloadState.FULLY_PRESENT:
                out[start] = image.read_meta(offset, n)
            elif state in _ZEROS or (state == PayloadState.NOT_PRESENT and not g.has_parent):
                out[start] = bytes(n)
        return out
    finally:
        image.close()


def repair(data: bytes) -> None:
    c = case(data)
    expected = expectations(c)
    before = None
    with refused():
        with Disk.open(c.path, read_only=True, host_factory=c.factory()) as disk:
            before = snapshot(disk)
    path = c.write_work_file()
    written = mark(path)
    report = None
    with refused():
        report = check_and_repair(path)
    if report is None:
        return  # not a VHDX file, or a child whose parent cannot be found any more
    if report.get("unrepairable"):
        assert stamp(path) == written, "an unrepairable image was changed"
        return
    assert report["status"] == "clean", f"repaired but not clean: {report}"
    with Disk.open(path, read_only=True) as disk:
        if before is not None:
            assert snapshot(disk) == before, "repair changed what a readable image read"
        for offset, want in expected.items():
            assert disk.read(offset, len(want)) == want, f"repair changed the sound block at {offset}"
    repaired = mark(path)
    again = repair_image(path)
    assert not again["repairs"] and not again["unrepairable"], f"a second repair did more: {again}"
    assert stamp(path) == repaired, "a second repair changed the file"
