"""`vhdxfs info --json`: the facts a script needs, agreeing with QEMU's view of the same image."""

from __future__ import annotations

import json

from tests.helpers import make_dirty_image, need_tools, run, vhdxfs
from vhdxfs.engine import create_child

MiB = 1 << 20
KEYS = {"format", "type", "virtual-size", "block-size", "logical-sector-size", "physical-sector-size",
        "virtual-disk-id", "file-write-guid", "data-write-guid", "log-guid", "parents", "allocated-bytes",
        "actual-size", "log-state", "log-dirty"}


def info(path) -> dict:
    result = vhdxfs("info", "--json", path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_info_agrees_with_qemu(tmp_path):
    need_tools("qemu-img", "qemu-io")
    path = tmp_path / "q.vhdx"
    assert run("qemu-img", "create", "-f", "vhdx", "-o", "block_size=2M", path, "100M").returncode == 0
    assert run("qemu-io", "-f", "vhdx", "-c", "write -P 1 3M 5M", path).returncode == 0
    ours = info(path)
    qemu = json.loads(run("qemu-img", "info", "--output=json", path).stdout)
    assert KEYS <= ours.keys()
    assert ours["format"] == qemu["format"] == "vhdx" and ours["type"] == "dynamic"
    assert ours["virtual-size"] == qemu["virtual-size"] and ours["block-size"] == qemu["cluster-size"]
    assert ours["allocated-bytes"] == 3 * 2 * MiB  # 3M..8M lies in blocks 1, 2 and 3 (2 MiB each)
    assert ours["parents"] == [] and ours["log-dirty"] is False and ours["log-state"] == "clean"


def test_info_of_a_child_and_of_a_dirty_log(tmp_path):
    base = make_dirty_image(tmp_path / "base.vhdx", 16 * MiB, 0, b"\x01" * 4096)
    dirty = info(base)
    assert dirty["log-dirty"] is True and dirty["log-entries-to-replay"] == 1
    assert info(base)["log-dirty"] is True  # info never writes: the log is still there to replay
    assert vhdxfs("check", "--repair", base).returncode == 0
    child = tmp_path / "child.avhdx"
    create_child(child, base)
    facts = info(child)
    assert facts["type"] == "differencing" and facts["parents"] == [str(base)]
    assert facts["parent-locator"]["parent_linkage"] == "{" + info(base)["data-write-guid"] + "}"
