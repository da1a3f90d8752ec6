"""One client, from accept to close: the handshake (with its time-out), then transmission. The exports
it sees are the server's as of its connection (their sizes fixed then: exports.py), and it is listed among
the server's clients (``vhdxfs status``) while it is connected."""

from __future__ import annotations

import logging
import socket
import struct

import trio

from . import protocol as p
from .exports import Client, Exports
from .handshake import Aborted, negotiate
from .transmission import Transmission
from .wire import Closed, Wire, cancel_when_set

log = logging.getLogger("vhdxfs.nbd")


async def handle_client(stream: trio.abc.Stream, exports: Exports, stopping: trio.Event) -> None:
    """Serve one connection; whatever the client does, only this connection ends."""
    wire = Wire(stream)
    client = Client(peer_of(stream))
    exports.clients[id(client)] = client
    exports = exports.at_connection()
    try:
        session = None
        with trio.move_on_after(exports.handshake_timeout) as timeout:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_when_set, stopping, nursery.cancel_scope)
                session = await negotiate(wire, exports)
                nursery.cancel_scope.cancel()
        if timeout.cancelled_caught:
            log.info("a client did not finish its handshake within %g s; disconnected", exports.handshake_timeout)
        if session is None:
            return
        transmission = Transmission(wire, session, exports.budget)
        client.export, client.size = transmission.export.name, transmission.export.size
        log.debug("a client uses export %s", transmission.export.name)
        await transmission.run(stopping)
    # trio nurseries raise exception groups: except* takes each kind out of them.
    except* Aborted as group:
        log.debug("negotiation ended: %s", group.exceptions[0])
    except* p.ProtocolError as group:
        log.warning("disconnecting a client that broke the protocol: %s", group.exceptions[0])
    except* Closed as group:
        log.debug("client gone: %s", group.exceptions[0])
    except* Exception:  # a bug must cost one connection, not the server and every other client
        log.exception("connection failed")
    finally:
        exports.clients.pop(id(client), None)
        await wire.aclose()


def peer_of(stream: trio.abc.Stream) -> str:
    """Who is at the other end: HOST:PORT over TCP; over a unix socket the peer's pid and uid."""
    while not isinstance(stream, trio.SocketStream):
        inner = getattr(stream, "transport_stream", None)  # trio.SSLStream
        if inner is None:
            return "unknown"
        stream = inner
    sock = stream.socket
    try:
        if sock.family == socket.AF_UNIX:
            pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return f"unix:pid={pid},uid={uid}"
        host, port = sock.getpeername()[:2]
    except OSError:
        return "unknown"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
