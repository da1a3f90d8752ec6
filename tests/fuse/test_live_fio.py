"""fio --verify (O_DIRECT, several requests in flight) on a mounted disk and on ext4 on a loop device over it,
while checkpoints, merges (inner and active) and resizes run again and again through the CLI: no verify
error, no failed request, every layer clean (our check and QEMU's where it opens them), and the chain as
libvhdi's vhdimount reads it equal to ours."""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.fuse.conftest import loop_ready_mount
from tests.helpers import make_image, need_root_fuse, need_tools, qemu_check_clean, run, sha256, vhdxfs
from vhdxfs.engine import Disk, check_image

MiB, GiB = 1 << 20, 1 << 30
ROUNDS = int(os.environ.get("VHDXFS_LIVE_FIO_ROUNDS", 4))
SECONDS = float(os.environ.get("VHDXFS_LIVE_FIO_SECONDS", 15))


def ok(*args: object) -> str:
    result = vhdxfs(*map(str, args))
    assert result.returncode == 0, result.stderr
    return result.stdout


def must(*args: object) -> str:
    result = run(*map(str, args))
    assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    return result.stdout


def fio_verify(target: Path | str, *, size: int, seconds: float, seed: int) -> subprocess.Popen[str]:
    """fio writing random 4-64 KiB blocks with crc32c headers and reading each back (O_DIRECT, QD 8; a
    ``nbd+unix://`` target goes through fio's nbd engine). ``--serialize_overlap``: with --norandommap two
    writes in flight at once may overlap, and no disk orders writes in flight (their overlap may hold either),
    so fio would report such a range as corrupt now and then (fio's documentation says so); a checkpoint's
    pause, which lets the queued requests go at once, made it frequent. fio then waits for the first of two
    overlapping writes before sending the second, so every verify failure is ours."""
    where = [f"--filename={target}", "--ioengine=libaio", "--direct=1"] if isinstance(target, Path) else \
        ["--ioengine=nbd", f"--uri={target}"]
    return subprocess.Popen(
        ["fio", "--output-format=json", *where, "--name=verify", "--rw=randwrite",
         "--bsrange=4k-64k", "--iodepth=8", f"--size={size}",
         f"--runtime={seconds}", "--time_based", "--verify=crc32c", "--verify_backlog=32", "--verify_fatal=1",
         "--do_verify=1", "--verify_state_save=0", f"--randseed={seed}", "--norandommap",
         "--serialize_overlap=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fio_result(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"fio failed ({proc.returncode}): {err[-2000:]}"
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    return job


def operate(mountpoint: Path, raw: Path, stop: threading.Event, rnd: random.Random, done: list[str],
            errors: list[str], grow: bool) -> None:
    """Checkpoint, merge the active top, checkpoint twice and merge the inner one, grow: again and again.
    ``mountpoint`` and ``raw`` are both TARGETs of the CLI (an NBD socket may be both)."""
    try:
        for _ in range(ROUNDS):
            if stop.is_set():
                return
            top = ok("checkpoint", raw).strip()
            done.append("checkpoint")
            time.sleep(rnd.uniform(0.05, 0.3))
            ok("merge", mountpoint, Path(top).name)  # the active top
            done.append("merge active")
            inner = ok("checkpoint", raw).strip()
            ok("checkpoint", raw)
            time.sleep(rnd.uniform(0.05, 0.3))
            ok("merge", mountpoint, Path(inner).name)  # an inner layer
            done.append("merge inner")
            chain = json.loads(ok("checkpoints", mountpoint, "--json"))
            ok("merge", mountpoint, Path(chain[0]["path"]).name)  # back to the base alone
            if grow:
                size = os.stat(raw).st_size
                ok("resize", raw, str(size + 64 * MiB))
                done.append("grow")
    except AssertionError as exc:
        errors.append(str(exc))


def chain_of(image: Path) -> list[Path]:
    with Disk.open(image, read_only=True) as disk:
        return disk.chain()


def check_chain(top: Path, raw_digest: str) -> None:
    for layer in chain_of(top):
        report = check_image(layer)
        assert report["status"] == "clean" and not report["errors"], report
    if len(chain_of(top)) == 1:
        qemu_check_clean(top)
    need_tools("vhdimount")
    assert vhdimount_digest(top) == raw_digest, "libvhdi reads the chain otherwise"


def vhdimount_digest(image: Path) -> str:
    point = image.parent / "vhdi"
    point.mkdir(exist_ok=True)
    must("vhdimount", image, point)
    try:
        return sha256(point / "vhdi1")
    finally:
        must("fusermount3", "-u", point)


@pytest.fixture
def mounted(tmp_path):
    need_root_fuse()
    need_tools("fio", "qemu-img")
    with loop_ready_mount(tmp_path) as m:
        yield m


def test_fio_verify_on_the_mount_while_the_chain_changes(tmp_path, mounted):
    image = make_image(tmp_path / "disk.vhdx", 512 * MiB, block_size=MiB)
    mounted.mount(image)
    raw = mounted.raw("disk.raw")
    stop, done, errors = threading.Event(), [], []
    fio = fio_verify(raw, size=256 * MiB, seconds=SECONDS, seed=11)
    operator = threading.Thread(target=operate, args=(mounted.mountpoint, raw, stop, random.Random(1), done,
                                                       errors, True))
    operator.start()
    job = fio_result(fio)
    stop.set()
    operator.join(timeout=300)
    assert not errors, errors
    assert {"checkpoint", "merge active", "merge inner", "grow"} <= set(done), done
    assert job["write"]["total_ios"] > 0 and job["read"]["total_ios"] > 0, "fio wrote and verified"
    digest = sha256(raw)
    top = Path(json.loads(ok("checkpoints", mounted.mountpoint, "--json"))[0]["path"])
    mounted.umount()
    check_chain(top, digest)


def test_fio_verify_in_ext4_on_a_loop_device_while_the_chain_changes(tmp_path, mounted):
    need_tools("mkfs.ext4", "losetup")
    image = make_image(tmp_path / "disk.vhdx", 768 * MiB, block_size=MiB)
    mounted.mount(image)
    raw = mounted.raw("disk.raw")
    loop = must("losetup", "--show", "-f", "--direct-io=on", raw).strip()
    fs = tmp_path / "fs"
    fs.mkdir()
    try:
        must("mkfs.ext4", "-q", "-E", "nodiscard", loop)
        must("mount", loop, fs)
        try:
            stop, done, errors = threading.Event(), [], []
            fio = fio_verify(fs / "data", size=192 * MiB, seconds=SECONDS, seed=12)
            operator = threading.Thread(target=operate, args=(mounted.mountpoint, raw, stop, random.Random(2),
                                                               done, errors, False))
            operator.start()
            fio_result(fio)
            stop.set()
            operator.join(timeout=300)
            assert not errors, errors
            assert {"checkpoint", "merge active", "merge inner"} <= set(done), done
        finally:
            must("umount", fs)
        fsck = run("e2fsck", "-fn", loop)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        must("losetup", "-d", loop)
    digest = sha256(raw)
    top = Path(json.loads(ok("checkpoints", mounted.mountpoint, "--json"))[0]["path"])
    mounted.umount()
    check_chain(top, digest)
