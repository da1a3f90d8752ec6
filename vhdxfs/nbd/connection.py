"""One client, from accept to close: the handshake (with its time-out), then transmission."""

from __future__ import annotations

import logging

import trio

from . import protocol as p
from .exports import Exports
from .handshake import Aborted, negotiate
from .transmission import Transmission
from .wire import Closed, Wire, cancel_when_set

log = logging.getLogger("vhdxfs.nbd")


async def handle_client(stream: trio.abc.Stream, exports: Exports, stopping: trio.Event) -> None:
    """Serve one connection; whatever the client does, only this connection ends."""
    wire = Wire(stream)
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
        await wire.aclose()
