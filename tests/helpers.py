"""Small helpers shared by tests: running the CLI and the peers, hashing files."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from vhdxfs.tools.create import ImageSpec, write_new_image


def vhdxfs(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real command line in a child process, as a user would."""
    return subprocess.run([sys.executable, "-m", "vhdxfs.cli", *map(str, args)], capture_output=True,
                          text=True, check=check)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, args)], capture_output=True, text=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_image(path: Path, size: int, **kw) -> Path:
    write_new_image(path, ImageSpec(size, **kw))
    return path


def qemu_check_clean(path: Path) -> None:
    result = run("qemu-img", "check", "-f", "vhdx", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found" in result.stdout


def make_dirty_image(path: Path, size: int, offset: int, data: bytes) -> Path:
    """An image whose only record of a write's allocation is in the log, as after a crash between the
    log write and its application: LogGuid set, the BAT in place still as before the write."""
    import trio

    from vhdxfs.engine.disk import VirtualDisk

    make_image(path, size, block_size=1 << 20)

    async def crash_after_log() -> None:
        disk = await VirtualDisk.open(path)
        bat_at, bat_len = disk.bat.region_offset, disk.geometry.bat_region_length
        before = disk.host.pread(bat_at, bat_len)
        await disk.write(offset, data)
        await disk.flush()
        disk.host.pwrite(bat_at, before)  # undo the in-place application: the log alone knows
        disk.host.fdatasync()
        disk.host.close()  # no clean close: LogGuid stays set

    trio.run(crash_after_log)
    return path


async def random_step(disk, model: bytearray, rnd, length: int, discard_ratio: float = 0.15) -> None:
    """One write of random bytes, or a discard, of ``length`` bytes at a random offset; mirrored in ``model``."""
    off = rnd.randrange(len(model))
    n = min(length, len(model) - off)
    if rnd.random() < discard_ratio:
        await disk.discard(off, n)
        model[off:off + n] = bytes(n)
    else:
        data = rnd.randbytes(n)
        await disk.write(off, data)
        model[off:off + n] = data


async def probe_read(disk, model: bytearray, rnd, max_length: int) -> None:
    """A read at a random place must return what the model holds."""
    off = rnd.randrange(len(model))
    n = min(rnd.randrange(1, max_length), len(model) - off)
    assert await disk.read(off, n) == bytes(model[off:off + n])
