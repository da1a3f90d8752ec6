"""What a server offers: one export per image, named by its stem like the mount's raw files, and how.

Names and descriptions come from the images as configured, fixed at start: a live checkpoint or merge moves
the disk onto another file, not the export. The size is the disk's as of the connection
(``Exports.at_connection``): after a live resize new connections see the new size, a connection made
before keeps the size it was told (NBD has no way to tell a client its export changed size), so its
requests stay inside that.

The transmission flags advertise exactly what works: every export can flush, take FUA, trim, write zeroes
(fast or not) and cache, and several connections may share it (CAN_MULTI_CONN: one engine behind all of
them, so a flush on one connection makes every completed write of every connection durable). A
read-only export advertises READ_ONLY and none of the writing commands.
"""

from __future__ import annotations

import dataclasses
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..engine import S3Location, parse_location
from ..engine.aio import AsyncDisk
from . import protocol as p
from .budget import ByteBudget

MAX_PAYLOAD = 32 << 20  # the largest READ or WRITE served (the protocol's interoperable maximum)


def export_name(image: str | Path | S3Location) -> str:
    """disk.vhdx -> "disk" (the mount shows it as disk.raw); s3://bucket/golden.vhdx -> "golden"."""
    return parse_location(image).stem


@dataclass
class Export:
    name: str
    disk: AsyncDisk
    image: str | None = None  # the image as configured (the disk's path moves with checkpoints)
    fixed_size: int | None = None  # the size told to one connection (``Exports.at_connection``)

    @property
    def read_only(self) -> bool:
        return self.disk.read_only

    @property
    def size(self) -> int:
        return self.disk.size if self.fixed_size is None else self.fixed_size

    @property
    def description(self) -> str:
        kind = "read-only" if self.read_only else "read-write"
        return f"{self.image or self.disk.path} ({kind})"

    def flags(self, structured: bool) -> int:
        flags = p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_FLUSH | p.TFLAG_SEND_FUA | p.TFLAG_CAN_MULTI_CONN | p.TFLAG_SEND_CACHE
        if self.read_only:
            flags |= p.TFLAG_READ_ONLY
        else:
            flags |= p.TFLAG_SEND_TRIM | p.TFLAG_SEND_WRITE_ZEROES | p.TFLAG_SEND_FAST_ZERO
        if structured:
            flags |= p.TFLAG_SEND_DF  # a read is always answered in one data chunk
        return flags

    def block_sizes(self) -> tuple[int, int, int]:
        """(minimum, preferred, maximum payload): any alignment works; whole sectors avoid read-modify-write
        in a differencing image, whole 4 KiB pages avoid it in the host's page cache."""
        return 1, max(4096, self.disk.logical_sector_size), MAX_PAYLOAD


@dataclass
class Client:
    """A connection, for `vhdxfs status`: where from, and the export it chose (None while negotiating)."""

    address: str
    connected: float = field(default_factory=time.time)
    export: str | None = None
    size: int | None = None  # the export's size as told to this client

    def snapshot(self) -> dict[str, object]:
        return {"address": self.address, "connected": self.connected, "export": self.export, "size": self.size}


@dataclass
class Exports:
    """The exports of one server, and its TLS policy (FORCEDTLS when a context is given)."""

    by_name: dict[str, Export] = field(default_factory=dict)
    tls: ssl.SSLContext | None = None
    handshake_timeout: float = 30.0
    budget: ByteBudget | None = None  # the data in flight of every connection together
    clients: dict[int, Client] = field(default_factory=dict)  # connected now, for `vhdxfs status`

    def at_connection(self) -> Exports:
        """This server's exports as one new connection sees them: each size fixed at its present value."""
        pinned = {name: dataclasses.replace(e, fixed_size=e.disk.size) for name, e in self.by_name.items()}
        return dataclasses.replace(self, by_name=pinned)

    def find(self, name: str) -> Export | None:
        """The export called ``name``; the empty name is the default export when there is only one."""
        if not name and len(self.by_name) == 1:
            return next(iter(self.by_name.values()))
        return self.by_name.get(name)
