"""The daemons over images in the store: mount -o ro and serve -o ro of every kind, byte for byte; a local
child over a remote base mounted read-write with ext4 on a loop device under fio --verify and a checkpoint,
which after unmount reads back as written through vhdxfs convert and through libvhdi (on a downloaded copy of
the base); the store stopped and restarted under a mount (EIO while it is gone, the daemon serving again once
it is back); the object never written (its ETag unchanged)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

import vhdxfs
from tests.fuse.conftest import loop_ready_mount
from tests.fuse.test_live_fio import fio_result, fio_verify
from tests.helpers import need_tools, run, sha256
from tests.helpers import vhdxfs as cli
from tests.nbd.conftest import serving
from tests.s3.conftest import wait_until

KINDS = ("dynamic", "fixed", "4k", "dirty")


def _digest_of(path: Path) -> str:
    with vhdxfs.open(path) as f:
        return hashlib.sha256(f.read()).hexdigest()


def _key(url: str) -> str:
    return url.split("/", 3)[3]


@pytest.fixture
def mnt(tmp_path):
    with loop_ready_mount(tmp_path) as m:
        yield m


def _local_child(images, tmp_path: Path) -> Path:
    """A local child over the remote dynamic base, some of its blocks written."""
    child = tmp_path / "child.avhdx"
    cli("create", child, "--parent", images["dynamic"][1], check=True)
    with vhdxfs.open(child, "r+b") as f:
        for i in range(8):
            f.seek(i * (7 << 20) + 4096)
            f.write(bytes([i + 1]) * 70000)
    return child


def test_mount_ro_of_every_kind(images, store, mnt, tmp_path):
    etags = {k: store.etag(_key(url)) for k, (_p, url) in images.items()}
    refused = mnt.mount(images["dynamic"][1], expect_ok=False)
    assert refused.returncode != 0 and "only read" in refused.stderr and "-o ro" in refused.stderr
    child = _local_child(images, tmp_path)
    mnt.mount(*(images[k][1] for k in KINDS), child, options="ro")
    for kind in KINDS:
        path, url = images[kind]
        raw = mnt.raw(Path(_key(url)).stem + ".raw")
        assert sha256(raw) == _digest_of(path), kind
    assert sha256(mnt.raw("child.raw")) == _digest_of(child)
    mnt.umount()
    assert {k: store.etag(_key(url)) for k, (_p, url) in images.items()} == etags


def test_serve_ro_of_every_kind(images, store, tmp_path):
    need_tools("nbdcopy")
    etags = {k: store.etag(_key(url)) for k, (_p, url) in images.items()}
    child = _local_child(images, tmp_path)
    with serving(*(images[k][1] for k in KINDS), child, "-o", "ro", socket_path=tmp_path / "s.sock") as server:
        for kind, export, source in [*((k, Path(_key(images[k][1])).stem, images[k][0]) for k in KINDS),
                                     ("chain", "child", child)]:
            out = tmp_path / f"{export}.raw"
            result = run("nbdcopy", server.uri(export), out)
            assert result.returncode == 0, result.stderr
            assert sha256(out) == _digest_of(source), kind
    assert {k: store.etag(_key(url)) for k, (_p, url) in images.items()} == etags


def test_a_guest_on_a_local_child_over_a_remote_base(images, store, mnt, tmp_path):
    need_tools("fio", "mkfs.ext4", "losetup", "e2fsck", "vhdimount")
    base, url = images["dynamic"]
    before = store.etag(_key(url))
    work = tmp_path / "vm"
    work.mkdir()
    child = work / "child.avhdx"
    cli("create", child, "--parent", url, check=True)
    mnt.mount(child)
    raw = mnt.raw("child.raw")
    loop = subprocess.run(["losetup", "--show", "-f", "--direct-io=on", raw], capture_output=True, text=True,
                          check=True).stdout.strip()
    fs = tmp_path / "fs"
    fs.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-E", "nodiscard", loop], check=True)
        subprocess.run(["mount", loop, fs], check=True)
        try:
            fio = fio_verify(fs / "data", size=24 << 20, seconds=4, seed=21)
            top = cli("checkpoint", raw, check=True).stdout.strip()  # a checkpoint under load
            fio_result(fio)
            merge = cli("merge", mnt.mountpoint, "child.avhdx")  # into the remote base: refused
            assert merge.returncode != 0 and "object store" in merge.stderr, merge.stderr
        finally:
            subprocess.run(["umount", fs], check=True)
        fsck = run("e2fsck", "-fn", loop)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    digest = sha256(raw)
    record = json.loads((work / "child.avhdx.chain").read_text())  # beside the lowest local layer
    assert record["layers"] == ["child.avhdx", Path(top).name]
    mnt.umount()
    assert store.etag(_key(url)) == before
    # vhdxfs convert reads the chain back: the local layers and the base in the store.
    out = tmp_path / "back.raw"
    converted = cli("convert", top, out)
    assert converted.returncode == 0, converted.stderr
    assert sha256(out) == digest
    # libvhdi, on a downloaded copy of the base next to the child (where relative_path points).
    (work / "dynamic.vhdx").write_bytes(store.get(_key(url)))
    assert _vhdimount_top_digest(Path(top)) == digest


def _vhdimount_top_digest(image: Path) -> str:
    """vhdimount shows every layer of a chain, base first (vhdi1): the last is the image itself."""
    point = image.parent / "vhdi"
    point.mkdir(exist_ok=True)
    result = run("vhdimount", image, point)
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        layers = sorted(point.iterdir(), key=lambda p: int(p.name.removeprefix("vhdi")))
        return sha256(layers[-1])
    finally:
        subprocess.run(["fusermount3", "-u", point], check=True)


def test_the_store_stopped_and_restarted_under_a_mount(images, rgw, mnt, monkeypatch):
    monkeypatch.setenv("VHDXFS_S3_TIMEOUT", "2")
    monkeypatch.setenv("VHDXFS_S3_RETRIES", "2")
    path, url = images["fixed"]
    mnt.mount(url, options="ro")
    raw = mnt.raw("fixed.raw")
    with vhdxfs.open(path) as f:
        expected = f.read()
    fd = os.open(raw, os.O_RDONLY | os.O_DIRECT)
    try:
        rgw.stop_gateway()
        try:
            with pytest.raises(OSError) as caught:
                os.preadv(fd, [_aligned(4096)], 9 << 20)
            assert caught.value.errno == 5
        finally:
            rgw.start_gateway()

        def reads() -> bool:
            buf = _aligned(4096)
            try:
                os.preadv(fd, [buf], 9 << 20)
            except OSError:
                return False
            return bytes(buf) == expected[9 << 20:(9 << 20) + 4096]
        wait_until(reads)
    finally:
        os.close(fd)
    mnt.umount()


def _aligned(n: int) -> memoryview:
    import mmap

    return memoryview(mmap.mmap(-1, n))
