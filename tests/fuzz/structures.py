"""The parent locator target: the item's parser on raw bytes, then the same bytes as the locator of a
real child image, opened with its chain.

The locator has no checksum, so raw bytes reach the parser directly; the in-image half re-uses the child
seed (tests/fuzz/seeds.py) with its Parent Locator item replaced by the input and the metadata table's
length for it updated, so parsing, validation (Metadata.validate), the parent search
(vhdxfs/engine/parent.py) and the linkage check all see it. Parents outside the seed directory are never
opened (tests/fuzz/guards.py memory_factory), so a locator naming /etc/passwd costs a stat, nothing more.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

from vhdxfs.engine import Disk
from vhdxfs.engine.image.parents import candidates, linkage_guids
from vhdxfs.format.metadata import Metadata, ParentLocator

from .cases import Case, snapshot
from .guards import refused
from .patches import Scratch, spans
from .seeds import seeds

MAX_ITEM = 4096
_SCRATCH: dict[str, Scratch] = {}  # reused: see tests/fuzz/patches.py Scratch
_EXAMPLE = Metadata(block_size=1 << 20, virtual_size=4 << 20, logical_sector_size=512, physical_sector_size=4096,
                    virtual_disk_id=__import__("uuid").UUID(int=1), has_parent=True)


def _parse(data: bytes) -> None:
    loc = None
    with refused():
        loc = ParentLocator.decode(data)
    if loc is None:
        return
    again = ParentLocator.decode(ParentLocator(loc.entries, loc.locator_type).encode())
    assert again == loc, "a decoded locator does not survive encode/decode"
    meta = replace(_EXAMPLE, parent_locator=loc)
    with refused():
        meta.validate()
        linkage_guids(meta)
    candidates(Path("/nonexistent/child.avhdx"), meta)


def _in_image(data: bytes) -> None:
    seed = seeds().pick(0, ("child",))
    locator = next(s for s in spans(seed) if s[0] == "parent locator")
    table = next(s for s in spans(seed) if s[0] == "metadata table")
    item = data[:MAX_ITEM]
    buf = _SCRATCH.setdefault("child", Scratch(seed.data))
    buf.restore(seed.data)
    buf.put(locator[1], item)
    count = struct.unpack_from("<H", buf, table[1] + 10)[0]
    for i in range(count):  # the Parent Locator's entry: its length becomes the input's
        at = table[1] + 32 + 32 * i
        if buf[at:at + 4] == bytes.fromhex("2d5fd3a8"):
            buf.put(at + 20, struct.pack("<I", len(item)))
    c = Case(seed, buf)
    with refused():
        with Disk.open(c.path, read_only=True, host_factory=c.factory()) as disk:
            snapshot(disk)


def locator(data: bytes) -> None:
    _parse(data)
    _in_image(data)
