"""`vhdxfs map`: which ranges hold data, read as zeros or are unallocated, and which file of a chain holds each."""

from __future__ import annotations

import json

import vhdxfs
from tests.helpers import make_image, need_tools, run
from tests.helpers import vhdxfs as cli

MiB = 1 << 20


def mapped(image, *args) -> list[dict]:
    result = cli("map", "--json", image, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_json_has_qemu_img_maps_fields_plus_the_layer(tmp_path):
    image = make_image(tmp_path / "d.vhdx", 16 * MiB, block_size=MiB)
    with vhdxfs.open(image, "r+b") as disk:
        disk.pwrite(2 * MiB, b"x" * MiB)
        disk.pwrite(4 * MiB, b"y" * MiB)
        disk.discard(4 * MiB, MiB)
    items = mapped(image)
    assert [(i["start"], i["length"], i["data"], i["zero"], i["present"]) for i in items] == [
        (0, 2 * MiB, False, True, False),         # never written: a hole
        (2 * MiB, MiB, True, False, True),        # data, with the file offset where it lies
        (3 * MiB, MiB, False, True, False),
        (4 * MiB, MiB, False, True, True),        # written, then discarded: a ZERO block
        (5 * MiB, 11 * MiB, False, True, False),
    ]
    assert all(i["depth"] == 0 and i["layer"] == str(image) for i in items)
    data = items[1]
    with open(image, "rb") as f:
        f.seek(data["offset"])
        assert f.read(8) == b"x" * 8


def test_a_chain_names_the_layer_of_each_extent(tmp_path):
    base = make_image(tmp_path / "base.vhdx", 8 * MiB, block_size=MiB)
    with vhdxfs.open(base, "r+b") as disk:
        disk.pwrite(0, b"b" * (2 * MiB))
    child = tmp_path / "child.avhdx"
    vhdxfs.create(child, parent=base)
    with vhdxfs.open(child, "r+b") as disk:
        disk.pwrite(MiB, b"c" * 4096)
    items = [(i["start"], i["length"], i["depth"], i["layer"]) for i in mapped(child) if i["data"]]
    assert items == [(0, MiB, 1, str(base)), (MiB, 4096, 0, str(child)), (MiB + 4096, MiB - 4096, 1, str(base))]
    text = cli("map", child).stdout
    assert "data" in text and "hole" in text and str(base) in text and "of data in 3 extents" in text


def test_the_data_lies_where_qemu_reads_data(tmp_path):
    """QEMU's vhdx driver reports every range as data (it has no block status); ours must lie within it,
    and hold exactly what QEMU reads there."""
    need_tools("qemu-img", "qemu-io")
    image = tmp_path / "q.vhdx"
    assert run("qemu-img", "create", "-q", "-f", "vhdx", image, "64M").returncode == 0
    assert run("qemu-io", "-f", "vhdx", "-c", "write -P 0x61 9M 3M", image).returncode == 0
    ours = [i for i in mapped(image) if i["data"]]
    theirs = json.loads(run("qemu-img", "map", "--output=json", "-f", "vhdx", image).stdout)
    qemu_data = [(t["start"], t["start"] + t["length"]) for t in theirs if t["data"]]
    assert ours and all(any(s <= i["start"] and i["start"] + i["length"] <= e for s, e in qemu_data) for i in ours)
    covered = sum(i["length"] for i in ours)
    assert 3 * MiB <= covered <= 3 * MiB + 2 * 8 * MiB  # the written range, rounded out to whole blocks
