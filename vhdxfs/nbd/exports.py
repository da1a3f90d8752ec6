"""What a server offers: one export per image, named by its stem like the mount's raw files, and how.

The transmission flags advertise exactly what works: every export can flush, take FUA, trim, write zeroes
(fast or not) and cache, and several connections may share it (CAN_MULTI_CONN: one engine behind all of
them, so a flush on one connection makes every completed write of every connection durable). A
read-only export advertises READ_ONLY and none of the writing commands.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.aio import AsyncDisk
from . import protocol as p
from .budget import ByteBudget

MAX_PAYLOAD = 32 << 20  # the largest READ or WRITE served (the protocol's interoperable maximum)


def export_name(image: str | Path) -> str:
    """disk.vhdx -> "disk" (the mount shows it as disk.raw)."""
    return Path(image).stem


@dataclass
class Export:
    name: str
    disk: AsyncDisk

    @property
    def read_only(self) -> bool:
        return self.disk.read_only

    @property
    def size(self) -> int:
        return self.disk.size

    @property
    def description(self) -> str:
        kind = "read-only" if self.read_only else "read-write"
        return f"{self.disk.path} ({kind})"

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
class Exports:
    """The exports of one server, and its TLS policy (FORCEDTLS when a context is given)."""

    by_name: dict[str, Export] = field(default_factory=dict)
    tls: ssl.SSLContext | None = None
    handshake_timeout: float = 30.0
    budget: ByteBudget | None = None  # the data in flight of every connection together

    def find(self, name: str) -> Export | None:
        """The export called ``name``; the empty name is the default export when there is only one."""
        if not name and len(self.by_name) == 1:
            return next(iter(self.by_name.values()))
        return self.by_name.get(name)
