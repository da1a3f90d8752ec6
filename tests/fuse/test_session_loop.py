"""pyfuse3's request loop as packaging/patch_pyfuse3.py rewrites it: reads first, runs each handler in the
task that read its request, and starts another reader only when a handler has to wait."""

from __future__ import annotations

import inspect
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyfuse3
import pytest

from tests.fuse.loopfs import PATTERN_SIZE, pattern
from tests.helpers import need_root_fuse
from vhdxfs.mount.mounts import find_mount

REPO = Path(__file__).resolve().parents[2]


def test_the_installed_pyfuse3_carries_every_vhdxfs_patch():
    level = int((REPO / "packaging" / "patch_pyfuse3.py").read_text().split("PATCH_LEVEL = ")[1].split()[0])
    assert getattr(pyfuse3, "VHDXFS_PATCH_LEVEL", 0) == level, "run ./setup.sh: pyfuse3 is not the patched build"
    assert pyfuse3.FALLOCATE_SUPPORTED


def test_the_request_loop_is_a_task_trio_can_run():
    """trio runs pure-Python coroutines as tasks; pyfuse3 wraps its Cython loop for that (``async_wrapper``).
    Cython silently drops a decorator that does not sit right above its def, and a bare Cython loop hung
    live mounts under load, so the patch must keep the wrapper in place."""
    loop = pyfuse3._session_loop  # a seam: the loop patch_pyfuse3.py rewrites
    assert inspect.iscoroutinefunction(loop) and hasattr(loop, "__wrapped__"), loop


@pytest.fixture
def loopfs(tmp_path):
    need_root_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "tests.fuse.loopfs", str(mnt)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while find_mount(mnt) is None:
        assert proc.poll() is None, f"loopfs ended: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "loopfs did not mount"
        time.sleep(0.05)
    try:
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def read_file(path: Path, offset: int = 0, length: int = 4096) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def in_thread(fn, *args) -> tuple[threading.Thread, list]:
    """Run fn in a daemon thread (a request the loop never answers must not hang the test)."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    thread.start()
    return thread, result


def test_a_waiting_handler_does_not_stop_other_requests(loopfs):
    gate, opened = in_thread(read_file, loopfs / "gate")
    time.sleep(0.3)  # the gate's read is in its handler now, waiting
    assert not opened, "the gate opened before its key was read"
    key, answer = in_thread(read_file, loopfs / "key")
    key.join(timeout=10)
    assert answer == [b"key"], "no task went on reading requests while the gate's handler waited"
    gate.join(timeout=10)
    assert opened == [b"open"]


def test_many_clients_at_once_get_their_own_data(loopfs):
    """Requests queue up while handlers run, finished at once or after waiting; each answer is its own."""
    rnd = random.Random(5)
    requests = [(rnd.randrange(0, PATTERN_SIZE - 65536), rnd.choice([512, 4096, 65536])) for _ in range(600)]

    def check(request: tuple[int, int]) -> None:
        offset, length = request
        assert read_file(loopfs / "pattern", offset, length) == pattern(offset, length)

    pool = ThreadPoolExecutor(max_workers=8)
    try:
        for future in [pool.submit(check, r) for r in requests]:
            future.result(timeout=60)  # a stuck loop fails the test instead of hanging it
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
