"""The seed images the fuzz targets mutate, built from code on first use (no binaries in the repository).

A fuzz input names a seed by its first byte and then patches it (tests/fuzz/patches.py), so the seeds are
the only multi-MiB objects and they are rebuilt, not stored: small images (4 MiB virtual, 1 MiB blocks,
4-8 MiB files) keep each execution cheap. GUIDs come from a fixed random generator so that the same code
builds the same bytes; QEMU's image is the exception (qemu-img picks its own GUIDs), which does not matter
since patches address structures by offset and every checksum is re-sealed after patching.

Every seed lives in one directory (a differencing child finds its parent there by relative path).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from vhdxfs.engine import Disk, ImageSpec, MemoryFile, create_child, create_image
from vhdxfs.engine.image import VhdxFile

MiB = 1 << 20
SIZE = 4 * MiB

# Seed names in the order a fuzz input's first byte picks them (never reorder: the corpora depend on it).
NAMES = ("ours", "ours4k", "fixed", "dirty", "dirty4k", "child", "dirtychild", "qemu")


@dataclass(frozen=True)
class Seed:
    name: str
    path: Path  # where it lies (parents are looked up beside it)
    data: bytes
    differencing: bool


def _guids(name: str) -> Callable[[], uuid.UUID]:
    rnd = random.Random(name)
    return lambda: uuid.UUID(int=rnd.getrandbits(128), version=4)


def _write_and_close(path: Path, writes: list[tuple[int, bytes]]) -> None:
    with Disk.open(path) as disk:
        for offset, data in writes:
            disk.write(offset, data)


def _write_and_crash(path: Path, writes: list[tuple[int, bytes]]) -> None:
    """Leave the image as a crash right after a flush would: the last allocation only in the log.

    The writes are flushed (a log entry plus its pages in place) but never closed, so LogGuid stays set;
    then the BAT region is put back as it was before, so only a replay restores the allocation (what
    tests/helpers.make_dirty_image does, for any seed)."""
    before = path.read_bytes()
    image = VhdxFile.open(path, read_only=True)
    bat_offset, bat_length = image.bat.region_offset, image.geometry.bat_region_length
    image.close()
    memory = MemoryFile(before, path=path)
    disk = Disk.open(path, host_factory=lambda p, writable: memory if Path(p) == path else _read_only(p))
    for offset, data in writes:
        disk.write(offset, data)
    disk.flush()
    memory.data[bat_offset:bat_offset + bat_length] = before[bat_offset:bat_offset + bat_length]
    path.write_bytes(memory.data)


def _read_only(path: object) -> MemoryFile:
    return MemoryFile(Path(str(path)).read_bytes(), path=str(path), writable=False)


WRITES = [(MiB - 100, b"\x5a" * (MiB + 200)), (3 * MiB + 4096, b"\xa5" * 8192)]
CHILD_WRITES = [(MiB + 512, b"\xc3" * 5000), (2 * MiB, b"\x3c" * MiB)]


def _build(directory: Path, name: str) -> tuple[Path, bool]:
    """Make seed ``name`` in ``directory`` (its parent first for a child); return (path, differencing)."""
    if name in ("child", "dirtychild"):
        base = directory / "base.vhdx"
        if not base.exists():  # "ours" comes first in NAMES
            shutil.copyfile(directory / "ours.vhdx", base)
        path = directory / f"{name}.avhdx"
        create_child(path, base, block_size=MiB)
        (_write_and_crash if name == "dirtychild" else _write_and_close)(path, CHILD_WRITES)
        return path, True
    path = directory / f"{name}.vhdx"
    if name == "qemu" and shutil.which("qemu-img") and shutil.which("qemu-io"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M,log_size=1M", str(path),
                        str(SIZE)], check=True, capture_output=True)
        subprocess.run(["qemu-io", "-f", "vhdx", "-c", f"write -P 0x11 {MiB - 512} {MiB + 1024}", str(path)],
                       check=True, capture_output=True)
        return path, False
    sector = 4096 if name.endswith("4k") else 512
    kind = "fixed" if name == "fixed" else "dynamic"
    create_image(path, ImageSpec(SIZE, disk_type=kind, block_size=MiB, logical_sector_size=sector))
    (_write_and_crash if name.startswith("dirty") else _write_and_close)(path, WRITES)
    return path, False


class SeedSet:
    """All seeds, built once per process into a private directory (tmpfs when there is one)."""

    def __init__(self, directory: Path | None = None) -> None:
        shm = Path("/dev/shm")
        self.directory = (directory or Path(tempfile.mkdtemp(prefix="vhdxfs-fuzz-",
                                                             dir=shm if shm.is_dir() else None))).resolve()
        self.seeds: list[Seed] = []
        for name in NAMES:
            with mock.patch("uuid.uuid4", _guids(name)):
                path, differencing = _build(self.directory, name)
            self.seeds.append(Seed(name, path, path.read_bytes(), differencing))
        self.by_path = {s.path: s.data for s in self.seeds}
        self.by_path[self.directory / "base.vhdx"] = self.seeds[0].data

    def pick(self, selector: int, names: tuple[str, ...] = NAMES) -> Seed:
        name = names[selector % len(names)]
        return self.seeds[NAMES.index(name)]

    def work_path(self, seed: Seed) -> Path:
        """Where a mutated copy of ``seed`` is written for targets that need a real file: beside the
        seeds, so a child's relative parent path still finds base.vhdx."""
        return self.directory / f"work-{seed.path.name}"

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


_SEEDS: SeedSet | None = None


def seeds() -> SeedSet:
    """The process's seed set (built on first use, removed at exit)."""
    global _SEEDS
    if _SEEDS is None:
        import atexit

        _SEEDS = SeedSet()
        atexit.register(_SEEDS.close)
    return _SEEDS
