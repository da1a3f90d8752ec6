"""PosixFile turning writable under readers: a live merge thaws a parent that other threads read meanwhile.

The parent was opened read-only; thawing it opens the file again for writing. Readers hold the descriptor
number all along, so the number must never be closed under them, nor handed to another file.
"""

from __future__ import annotations

import os
import threading

import pytest

from vhdxfs.engine.image.posix import PosixFile
from vhdxfs.errors import ImageLockedError

SIZE = 64 << 10


def _readers(file: PosixFile, want: bytes, stop: threading.Event, failures: list[str]) -> list[threading.Thread]:
    def read() -> None:
        view = memoryview(bytearray(4096))
        while not stop.is_set():
            try:
                file.pread_into(8192, view)
            except Exception as exc:  # noqa: BLE001 - every failure is the finding
                failures.append(repr(exc))
                return
            if view.tobytes() != want[8192:8192 + 4096]:
                failures.append("read bytes of another file")
                return

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    return threads


def test_readers_never_see_the_descriptor_change_when_the_file_turns_writable(tmp_path):
    other = (tmp_path / "other").open("wb")
    other.write(b"B" * SIZE)
    other.close()
    failures: list[str] = []
    for round in range(150):
        path = tmp_path / f"image-{round}"
        want = bytes([65 + round % 20]) * SIZE
        path.write_bytes(want)
        file = PosixFile(path, writable=False)
        stop = threading.Event()
        threads = _readers(file, want, stop, failures)
        try:
            file.set_writable(True)
            # Opens right after: a closed descriptor number would be taken by one of these.
            opened = [os.open(tmp_path / "other", os.O_RDONLY) for _ in range(4)]
            for fd in opened:
                os.close(fd)
            file.pwrite(0, b"w")
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            file.close()
        assert not failures, failures[:3]


def test_a_file_made_writable_is_locked_exclusively_and_shared_again_when_frozen(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(bytes(SIZE))
    file = PosixFile(path, writable=False)
    try:
        reader = PosixFile(path, writable=False)  # shared with another reader while read-only
        reader.close()
        file.set_writable(True)
        with pytest.raises(ImageLockedError):
            PosixFile(path, writable=False)
        file.pwrite(0, b"x")
        file.set_writable(False)
        PosixFile(path, writable=False).close()
        with pytest.raises(ImageLockedError):
            PosixFile(path, writable=True)
    finally:
        file.close()
    assert path.read_bytes()[:1] == b"x"


def test_a_file_taken_by_another_reader_is_not_made_writable(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(bytes(SIZE))
    file = PosixFile(path, writable=False)
    reader = PosixFile(path, writable=False)
    try:
        with pytest.raises(ImageLockedError):
            file.set_writable(True)
        reader.close()
        file.set_writable(True)  # once the other reader is gone
        file.pwrite(0, b"y")
    finally:
        file.close()
        reader.close()
