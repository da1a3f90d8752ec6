"""A mounted disk managed while it runs, through the real CLI and real mounts: checkpoint, checkpoints, merge
(inner and active), resize (the raw file's size right at once; losetup -c), status as JSON and Prometheus
text, the frozen base that mounts its chain's top, a read-only mount of a checkpoint while the disk runs,
and offline commands that refuse an image a daemon holds, naming it."""

from __future__ import annotations

import json
import os
import random
import re
import threading
from pathlib import Path

import pytest

from tests.fuse.conftest import Mount, force_unmount
from tests.helpers import make_image, need_root_fuse, need_tools, run, vhdxfs
from vhdxfs.engine import Disk, check_image
from vhdxfs.service.records import holders_of

MiB = 1 << 20


@pytest.fixture
def mounts(tmp_path):
    """mounts(name) -> a Mount on tmp_path/name, unmounted whatever the test did."""
    need_root_fuse()
    made: list[Mount] = []

    def make(name: str) -> Mount:
        point = tmp_path / name
        point.mkdir()
        made.append(Mount(point))
        return made[-1]

    yield make
    for m in made:
        force_unmount(m.mountpoint)


def ok(*args) -> str:
    result = vhdxfs(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails(*args) -> str:
    result = vhdxfs(*args)
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("vhdxfs: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def put(raw: Path, model: bytearray, offset: int, data: bytes) -> None:
    with open(raw, "r+b") as f:
        f.seek(offset)
        f.write(data)
    model[offset:offset + len(data)] = data


def clean(path: Path) -> None:
    report = check_image(path)
    assert report["status"] == "clean" and not report["errors"], report


def test_checkpoints_and_merges_of_a_mounted_disk(tmp_path, mnt):
    size = 32 * MiB
    base = make_image(tmp_path / "disk.vhdx", size, block_size=MiB)
    rnd = random.Random(5)
    model = bytearray(size)
    mnt.mount(base)
    raw = mnt.raw("disk.raw")
    inode = raw.stat().st_ino
    put(raw, model, 0, rnd.randbytes(6 * MiB))
    monday = Path(ok("checkpoint", raw, "--name", "monday").strip())
    assert monday == tmp_path / "monday.avhdx"
    put(raw, model, 5 * MiB + 512, rnd.randbytes(3 * MiB))
    top = Path(ok("checkpoint", mnt.mountpoint).strip())
    assert top.name.startswith("disk_") and top.suffix == ".avhdx"
    put(raw, model, 20 * MiB, rnd.randbytes(2 * MiB))
    layers = json.loads(ok("checkpoints", base, "--json"))
    assert [(layer["path"], layer["role"]) for layer in layers] == [
        (str(top), "top"), (str(monday), "frozen"), (str(base), "frozen")]
    assert holders_of(monday) == [(mnt.daemon_pid(), "mount", str(mnt.mountpoint))]  # the record lists it
    human = ok("checkpoints", raw)
    assert str(top) in human and "frozen" in human

    assert "merged" in ok("merge", raw, "monday")  # an inner layer, by its stem
    assert not monday.exists() and holders_of(monday) == []
    assert raw.read_bytes() == model
    put(raw, model, 30 * MiB, rnd.randbytes(MiB))
    out = ok("merge", mnt.mountpoint, top.name)  # the active top, by its file name
    assert f"into {base}" in out and not top.exists()
    assert json.loads(ok("checkpoints", raw, "--json"))[0]["path"] == str(base)
    assert raw.stat().st_ino == inode and raw.read_bytes() == model  # the same file all along
    mnt.umount()
    assert not (tmp_path / "disk.vhdx.chain").exists()
    clean(base)
    with Disk.open(base, read_only=True) as disk:
        assert bytes(disk.read(0, size)) == model


def test_a_live_resize_shows_at_once_and_a_loop_device_follows(tmp_path, mnt):
    need_tools("losetup", "blockdev", "qemu-img")
    base = make_image(tmp_path / "disk.vhdx", 16 * MiB, block_size=MiB)
    mnt.mount(base)
    raw = mnt.raw("disk.raw")
    assert raw.stat().st_size == 16 * MiB  # the kernel caches this for an hour
    loop = run("losetup", "-f", "--show", raw).stdout.strip()
    assert loop.startswith("/dev/loop")
    try:
        out = ok("resize", raw, "40M")
        assert "16 MiB -> 40 MiB (live, the vhdxfs mount daemon" in out
        assert os.stat(raw).st_size == 40 * MiB  # at once
        assert run("losetup", "-c", loop).returncode == 0
        assert run("blockdev", "--getsize64", loop).stdout.strip() == str(40 * MiB)
        with open(loop, "r+b", buffering=0) as dev:
            dev.seek(39 * MiB)
            dev.write(b"z" * MiB)
            os.fsync(dev.fileno())
    finally:
        run("losetup", "-d", loop)
    os.truncate(raw, 40 * MiB)  # what QEMU's block_resize does, to exactly the size: fine
    with pytest.raises(PermissionError):
        os.truncate(raw, 48 * MiB)
    assert "already 40 MiB" in ok("resize", base, "40M")  # through the image the daemon holds
    assert fails("resize", mnt.mountpoint, "8M").startswith(f"vhdxfs: {mnt.mountpoint}: SIZE: 8 MiB is smaller")
    mnt.umount()
    info = json.loads(run("qemu-img", "info", "--output=json", base).stdout)
    assert info["virtual-size"] == 40 * MiB
    with Disk.open(base, read_only=True) as disk:
        assert bytes(disk.read(39 * MiB, MiB)) == b"z" * MiB


def test_a_frozen_base_mounts_the_top_and_a_backup_reads_the_checkpoint(tmp_path, mounts):
    size = 16 * MiB
    base = make_image(tmp_path / "disk.vhdx", size, block_size=MiB)
    rnd = random.Random(9)
    live, backup = mounts("live"), mounts("backup")
    live.mount(base)
    raw = live.raw("disk.raw")
    model = bytearray(size)
    put(raw, model, 0, rnd.randbytes(size))
    checkpoint = bytes(model)
    top = Path(ok("checkpoint", raw).strip())

    def writer() -> None:  # the disk goes on writing while the backup reads
        w = random.Random(10)
        for _ in range(64):
            put(raw, model, w.randrange(size // 4096) * 4096, w.randbytes(64 * 1024))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        backup.mount(base, options="ro")  # the checkpoint itself, read-only
        assert backup.raw("disk.raw").read_bytes() == checkpoint
    finally:
        thread.join()
    assert raw.read_bytes() == bytes(model)
    # The checkpoint cannot be merged away while the backup reads it; the message names the backup.
    refused = fails("merge", raw, top.name)
    assert f"in use by the vhdxfs mount daemon {backup.daemon_pid()} at {backup.mountpoint}" in refused
    status = json.loads(ok("status", backup.mountpoint, "--json"))
    assert [layer["path"] for layer in status["images"][0]["chain"]] == [str(base)]
    backup.umount()
    live.umount()
    clean(top)
    # The unit file or fstab line names disk.vhdx: a writable mount of it opens the top, as disk.raw.
    live.mount(base)
    assert live.raw("disk.raw").read_bytes() == bytes(model)
    status = json.loads(ok("status", live.raw("disk.raw"), "--json"))
    assert [layer["path"] for layer in status["images"][0]["chain"]] == [str(top), str(base)]
    assert status["images"][0]["image"] == str(base)


def test_offline_commands_refuse_a_held_image_naming_the_daemon(tmp_path, mnt):
    base = make_image(tmp_path / "disk.vhdx", 16 * MiB, block_size=MiB)
    mnt.mount(base)
    pid = mnt.daemon_pid()
    point = mnt.mountpoint
    said = f"in use by the vhdxfs mount daemon {pid} at {point}; stop it first (vhdxfs umount {point})"
    assert fails("compact", base) == f"vhdxfs: {base}: {said}\n"
    put(mnt.raw("disk.raw"), bytearray(16 * MiB), 0, b"x" * MiB)
    top = Path(ok("checkpoint", mnt.mountpoint).strip())
    # The frozen base: reading commands work, writing ones are refused with the daemon's name.
    assert ok("info", base) and ok("map", base) and ok("check", base)
    assert fails("check", "--repair", base) == f"vhdxfs: {base}: {said}\n"
    assert said in fails("commit", top)
    assert "merge the checkpoints first" in fails("resize", base, "32M")  # live: the daemon says why not
    assert "is not a layer of the running chain" in fails("merge", mnt.mountpoint, "nosuch")
    assert "no running vhdxfs daemon" in fails("status", tmp_path / "nowhere")
    other = make_image(tmp_path / "other.vhdx", 16 * MiB)
    assert "no running vhdxfs daemon holds this image" in fails("checkpoint", other)


def test_a_daemon_of_several_images_asks_which(tmp_path, mnt):
    a = make_image(tmp_path / "a.vhdx", 8 * MiB)
    b = make_image(tmp_path / "b.vhdx", 8 * MiB)
    mnt.mount(a, b)
    assert "serves 2 images (a.raw, b.raw); name one with --image NAME" in fails("checkpoint", mnt.mountpoint)
    top = Path(ok("checkpoint", mnt.mountpoint, "--image", "b").strip())
    assert top.name.startswith("b_")
    assert Path(ok("checkpoint", mnt.raw("a.raw")).strip()).name.startswith("a_")
    status = json.loads(ok("status", mnt.mountpoint, "--json"))
    assert [image["name"] for image in status["images"]] == ["a.raw", "b.raw"]
    assert [image["name"] for image in json.loads(ok("status", b, "--json"))["images"]] == ["b.raw"]
    assert "no image 'c'" in fails("status", mnt.mountpoint, "--image", "c")


# -- Prometheus ----------------------------------------------------------------------------------------------
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')


def parse_exposition(text: str) -> dict[str, dict]:
    """Prometheus' text format, strictly: HELP and TYPE once per family and before its samples, a family's
    samples together, label sets well formed, values numbers; {family: {"type", "samples": [(name, labels,
    value)]}}."""
    families: dict[str, dict] = {}
    current = None
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in families, f"{name} twice"
            current = families[name] = {"type": None, "samples": []}
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert current is families[name] and kind in ("counter", "gauge", "histogram")
            current["type"] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample: {line!r}"
            name, labels, value = match.groups()
            family = re.sub(r"_(bucket|count|sum)$", "", name) if current["type"] == "histogram" else name
            assert current is families[family], f"{name} outside its family"
            current["samples"].append((name, dict(LABEL.findall(labels or "")), float(value)))
    return families


def test_status_as_prometheus_text(tmp_path, mnt):
    base = make_image(tmp_path / "disk.vhdx", 16 * MiB, block_size=MiB)
    mnt.mount(base)
    raw = mnt.raw("disk.raw")
    put(raw, bytearray(16 * MiB), 0, b"p" * (2 * MiB))
    raw.read_bytes()
    ok("checkpoint", raw)
    families = parse_exposition(ok("status", raw, "--prometheus"))
    value = {(name, tuple(sorted(labels.items()))): v for f in families.values() for name, labels, v in f["samples"]}
    assert value[("vhdxfs_chain_layers", (("image", "disk.raw"),))] == 2
    assert value[("vhdxfs_virtual_size_bytes", (("image", "disk.raw"),))] == 16 * MiB
    writes = value[("vhdxfs_requests_total", (("image", "disk.raw"), ("kind", "write")))]
    assert writes >= 1 and value[("vhdxfs_bytes_total", (("image", "disk.raw"), ("kind", "write")))] == 2 * MiB
    histogram = families["vhdxfs_request_duration_seconds"]
    assert histogram["type"] == "histogram"
    for kind in ("read", "write", "zero", "flush"):
        buckets = [(labels["le"], v) for name, labels, v in histogram["samples"]
                   if name.endswith("_bucket") and labels["kind"] == kind]
        edges = [float(le) for le, _ in buckets]
        counts = [v for _, v in buckets]
        assert edges == sorted(edges) and edges[-1] == float("inf") and counts == sorted(counts)
        count = value[("vhdxfs_request_duration_seconds_count", (("image", "disk.raw"), ("kind", kind)))]
        assert counts[-1] == count == value[("vhdxfs_requests_total", (("image", "disk.raw"), ("kind", kind)))]
    info = families["vhdxfs_daemon_info"]["samples"][0][1]
    assert info["kind"] == "mount" and info["key"] == str(mnt.mountpoint) and int(info["pid"]) == mnt.daemon_pid()
