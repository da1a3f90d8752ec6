"""What the transmission phase decides about a request before any I/O: the error it gets without running
(``refusal``) and the budget it takes while in flight (``cost``).

Both are pure functions of the request and what was negotiated, so they are public seams: Transmission
(transmission.py) calls them for every request, and the fuzz target (tests/fuzz/nbd_target.py) feeds
them every header a client could send, with stand-ins for the export and the session that carry only
what these functions read (``ExportLimits``, ``Negotiated``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from . import protocol as p
from .exports import MAX_PAYLOAD

BLOCK_STATUS_COST = 64 << 10  # budget taken by a block status reply
WRITING = frozenset({p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES})  # the commands a read-only export refuses


class ExportLimits(Protocol):
    """What ``refusal`` reads of an export (exports.Export)."""

    @property
    def read_only(self) -> bool: ...

    @property
    def size(self) -> int: ...


class Negotiated(Protocol):
    """What ``refusal`` reads of a session (handshake.Session): the metadata contexts the client chose."""

    @property
    def contexts(self) -> Mapping[int, str]: ...


def refusal(request: p.Request, export: ExportLimits, session: Negotiated) -> int:
    """The protocol error ``request`` gets before it runs, 0 when it may run."""
    allowed = p.ALLOWED_FLAGS.get(request.type)
    if allowed is None or request.flags & ~allowed:
        return p.EINVAL  # an unknown command, or a flag it does not take
    if request.type in WRITING and export.read_only:
        return p.EPERM
    if request.type == p.CMD_BLOCK_STATUS and (not session.contexts or not request.length):
        return p.EINVAL
    if request.type == p.CMD_READ and request.length > MAX_PAYLOAD:
        return p.EOVERFLOW if request.flags & p.CMD_FLAG_DF else p.EINVAL
    if request.type != p.CMD_FLUSH and request.offset + request.length > export.size:
        return p.ENOSPC if request.type in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.EINVAL
    return 0


def cost(request: p.Request) -> int:
    """The bytes of budget ``request`` holds while in flight: its data (at most MAX_PAYLOAD), a block status
    reply's size estimate, nothing for the others."""
    if request.type in (p.CMD_READ, p.CMD_WRITE):
        return min(request.length, MAX_PAYLOAD)
    return BLOCK_STATUS_COST if request.type == p.CMD_BLOCK_STATUS else 0
