"""A host file that loses power: it keeps what an fdatasync made durable apart from what is only written.

``PowerCutHost`` is a HostIO (vhdxfs.engine.image.host) for the host seam. Writes since the last fdatasync are volatile;
at the chosen operation number the power goes: the operation raises ``PowerCut``, and ``survivor()``
builds what a disk could hold afterwards: the durable bytes plus a random subset of the volatile
writes, each kept whole, dropped, or torn at 512-byte granularity; an unsynced size change may be lost.
"""

from __future__ import annotations

import random
from pathlib import Path

from vhdxfs.engine import FileBase

SECTOR = 512


class PowerCut(Exception):
    """The simulated power failure."""


class Disk:
    """The medium: durable bytes, volatile writes, and an operation counter that trips the cut."""

    def __init__(self, content: bytes, cut_at: int | None, rnd: random.Random) -> None:
        self.durable = bytearray(content)
        self.durable_size = len(content)
        self.volatile = bytearray(content)
        self.pending: list[tuple[int, bytes]] = []
        self.ops = 0
        self.cut_at = cut_at
        self.cut = False
        self.rnd = rnd

    def tick(self) -> None:
        if self.cut:
            raise PowerCut()
        self.ops += 1
        if self.cut_at is not None and self.ops >= self.cut_at:
            self.cut = True
            raise PowerCut()

    def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > len(self.volatile):
            self.volatile.extend(bytes(end - len(self.volatile)))
        self.volatile[offset:end] = data
        self.pending.append((offset, bytes(data)))

    def sync(self) -> None:
        for offset, data in self.pending:
            end = offset + len(data)
            if end > len(self.durable):
                self.durable.extend(bytes(end - len(self.durable)))
            self.durable[offset:end] = data
        self.pending.clear()
        del self.durable[len(self.volatile):]
        self.durable.extend(bytes(len(self.volatile) - len(self.durable)))
        self.durable_size = len(self.volatile)

    def survivor(self) -> bytes:
        """What the medium holds after the cut: durable data plus some of the volatile writes."""
        out = bytearray(self.durable)
        for offset, data in self.pending:
            fate = self.rnd.random()
            if fate < 0.35:
                continue  # lost
            for s in range(0, len(data), SECTOR):
                if fate < 0.7 and self.rnd.random() < 0.5:
                    continue  # torn: this sector never made it
                piece = data[s:s + SECTOR]
                end = offset + s + len(piece)
                if end > len(out):
                    out.extend(bytes(end - len(out)))
                out[offset + s:end] = piece
        size = len(self.volatile) if self.rnd.random() < 0.5 else self.durable_size
        size = max(size, self.durable_size)
        del out[size:]
        out.extend(bytes(size - len(out)))
        return bytes(out)


class PowerCutHost(FileBase):
    """A host file over a ``Disk`` in memory; no OS file, no lock."""

    def __init__(self, path: str | Path, *, writable: bool, disk: Disk) -> None:
        self.path = Path(path)
        self.writable = writable
        self.disk = disk

    def size(self) -> int:
        return len(self.disk.volatile)

    def pread_into(self, offset: int, view: memoryview) -> None:
        if self.disk.cut:
            raise PowerCut()
        data = self.disk.volatile[offset:offset + len(view)]
        view[:len(data)] = data
        view[len(data):] = bytes(len(view) - len(data))

    def pwrite(self, offset: int, data) -> None:
        self.disk.tick()
        self.disk.write(offset, bytes(data))

    def fdatasync(self) -> None:
        self.disk.tick()
        self.disk.sync()

    def truncate(self, size: int) -> None:
        self.disk.tick()
        v = self.disk.volatile
        del v[size:]
        v.extend(bytes(size - len(v)))

    def punch_hole(self, offset: int, length: int) -> bool:
        length = max(0, min(length, len(self.disk.volatile) - offset))
        self.pwrite(offset, bytes(length))
        return True

    def allocate(self, offset: int, length: int) -> None:
        if len(self.disk.volatile) < offset + length:
            self.truncate(offset + length)

    def close(self) -> None:
        return None
