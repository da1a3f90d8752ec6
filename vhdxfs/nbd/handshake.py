"""Option haggling (fixed newstyle): from the greeting to the export a client chose, or to its leaving.

With TLS configured the server runs in FORCEDTLS mode: before STARTTLS every option but STARTTLS and
ABORT is answered NBD_REP_ERR_TLS_REQD, and EXPORT_NAME (which cannot be answered with an error) ends the
session. Unknown options get NBD_REP_ERR_UNSUP, malformed ones NBD_REP_ERR_INVALID (more than 64 metadata
context queries: NBD_REP_ERR_TOO_BIG); the session goes on. What ends it: a bad magic, unknown client
flags, an option longer than 64 KiB, a failed TLS handshake, the client leaving, or the time-out around
the whole negotiation (server.py).

Metadata contexts: ``base:allocation`` and ``qemu:allocation-depth`` (``select_contexts`` says which
queries name them). SET_META_CONTEXT gives them the fixed ids 1 and 2; its selection holds if the client
enters transmission with the export it named (transmission.py answers BLOCK_STATUS with one chunk per
selected context). QEMU's context: an extent's whole 32-bit value is the depth in the backing chain of the
layer that holds it, 0 unallocated in every layer, 1 the exported image itself, 2 its parent...
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field

import trio

from . import protocol as p
from .exports import Export, Exports
from .wire import Wire

log = logging.getLogger("vhdxfs.nbd")
META_CONTEXTS = (p.BASE_ALLOCATION, p.ALLOCATION_DEPTH)  # every metadata context offered, in id order
# The metadata context ids SET_META_CONTEXT gives: fixed, one per context.
BASE_ALLOCATION_ID, ALLOCATION_DEPTH_ID = 1, 2
CONTEXT_IDS = {p.BASE_ALLOCATION: BASE_ALLOCATION_ID, p.ALLOCATION_DEPTH: ALLOCATION_DEPTH_ID}


def select_contexts(queries: tuple[str, ...], *, listing: bool) -> tuple[str, ...]:
    """The contexts of META_CONTEXTS that ``queries`` name, each once and in META_CONTEXTS order.

    Both options take full names (``base:allocation``, ``qemu:allocation-depth``). Listing takes wildcards
    besides: no query at all lists every context, and a namespace with an empty leaf-name (``base:``,
    ``qemu:``) lists that namespace's; setting ignores them, as the protocol asks. Unknown names, in a known
    namespace or not, select nothing and are no error (``qemu:dirty-bitmap:x``: this server has no dirty
    bitmaps). A query without a namespace is malformed: OptionError.
    """
    for query in queries:
        namespace, colon, _ = query.partition(":")
        if not colon or not namespace:
            raise p.OptionError(f"query {query!r} has no namespace")
    if listing and not queries:
        return META_CONTEXTS
    return tuple(name for name in META_CONTEXTS
                 if name in queries or (listing and name[:name.index(":") + 1] in queries))


@dataclass
class Session:
    """What a client negotiated: the export, structured replies, metadata contexts."""

    export: Export | None = None
    structured: bool = False
    no_zeroes: bool = False
    tls: bool = False
    contexts_for: str | None = None  # the export SET_META_CONTEXT chose its contexts for
    contexts: dict[int, str] = field(default_factory=dict)  # id -> name, as SET_META_CONTEXT answered


class Aborted(Exception):
    """The client ended the negotiation (NBD_OPT_ABORT), or must be disconnected."""


async def negotiate(wire: Wire, exports: Exports) -> Session:
    """Greet, haggle, and return the session once the client enters transmission. Raises Aborted when
    the client leaves or must be disconnected, p.ProtocolError when it breaks the protocol."""
    await wire.send(p.server_greeting())
    client_flags = p.parse_client_flags(await wire.exactly(4))
    session = Session(no_zeroes=bool(client_flags & p.FLAG_C_NO_ZEROES))
    while True:
        option, length = p.parse_option_header(await wire.exactly(p.OPTION_HEADER_SIZE))
        data = await wire.exactly(length)
        if exports.tls is not None and not session.tls and option not in (p.OPT_STARTTLS, p.OPT_ABORT):
            if option == p.OPT_EXPORT_NAME:
                raise Aborted("NBD_OPT_EXPORT_NAME before TLS: the server requires TLS")
            await _reply(wire, option, p.REP_ERR_TLS_REQD, "TLS is required: use NBD_OPT_STARTTLS first")
            continue
        try:
            if await _option(wire, exports, session, option, data):
                return session
        except p.TooBig as exc:
            await _reply(wire, option, p.REP_ERR_TOO_BIG, str(exc))
        except p.OptionError as exc:
            await _reply(wire, option, p.REP_ERR_INVALID, str(exc))


async def _reply(wire: Wire, option: int, kind: int, message: str = "") -> None:
    await wire.send(p.option_reply(option, kind, p.utf8_prefix(message)))


async def _option(wire: Wire, exports: Exports, session: Session, option: int, data: bytes) -> bool:
    """Answer one option; True when the client enters transmission."""
    if option == p.OPT_EXPORT_NAME:
        export = exports.find(data.decode(errors="replace"))
        if export is None:
            raise Aborted(f"no export called {data.decode(errors='replace')!r}")
        session.export = export
        await wire.send(p.export_name_reply(export.size, export.flags(session.structured), session.no_zeroes))
        session.contexts = session.contexts if session.contexts_for == export.name else {}
        return True
    if option == p.OPT_ABORT:
        await _reply(wire, option, p.REP_ACK)
        raise Aborted("the client aborted the negotiation")
    if option in (p.OPT_LIST, p.OPT_STRUCTURED_REPLY) and data:
        raise p.OptionError("this option takes no data")
    if option == p.OPT_LIST:
        for export in exports.by_name.values():
            await _reply_data(wire, option, p.REP_SERVER, p.server_entry(export.name, export.description))
        await _reply(wire, option, p.REP_ACK)
    elif option == p.OPT_STARTTLS:
        await _starttls(wire, exports, session, data)
    elif option in (p.OPT_INFO, p.OPT_GO):
        return await _info(wire, exports, session, option, p.parse_info_request(data))
    elif option == p.OPT_STRUCTURED_REPLY:
        session.structured = True
        await _reply(wire, option, p.REP_ACK)
    elif option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
        if option == p.OPT_SET_META_CONTEXT:  # replaces the selection, even when it fails
            session.contexts, session.contexts_for = {}, None
        await _meta_context(wire, exports, session, option, p.parse_meta_context_request(data))
    else:
        await _reply(wire, option, p.REP_ERR_UNSUP, f"option {option} is not supported")
    return False


async def _reply_data(wire: Wire, option: int, kind: int, data: bytes) -> None:
    await wire.send(p.option_reply(option, kind, data))


async def _starttls(wire: Wire, exports: Exports, session: Session, data: bytes) -> None:
    option = p.OPT_STARTTLS
    if exports.tls is None:
        await _reply(wire, option, p.REP_ERR_POLICY, "this server does not offer TLS")
        return
    if data or session.tls:
        raise p.OptionError("STARTTLS takes no data" if data else "TLS is already on")
    if wire.buffered:
        raise Aborted("the client sent data after STARTTLS before the server's answer")
    await _reply(wire, option, p.REP_ACK)
    stream = trio.SSLStream(wire.stream, exports.tls, server_side=True)
    try:
        await stream.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        raise Aborted(f"TLS handshake failed: {exc.__cause__ or exc}") from None
    wire.upgrade(stream)
    # The protocol: nothing negotiated before STARTTLS survives it.
    session.tls, session.structured, session.contexts, session.contexts_for = True, False, {}, None


async def _info(wire: Wire, exports: Exports, session: Session, option: int, request: p.InfoRequest) -> bool:
    export = exports.find(request.name)
    if export is None:
        await _reply(wire, option, p.REP_ERR_UNKNOWN, f"no export called {request.name!r}")
        return False
    flags = export.flags(session.structured)
    await _reply_data(wire, option, p.REP_INFO, p.info_export(export.size, flags))
    if p.INFO_NAME in request.items or not request.name:
        await _reply_data(wire, option, p.REP_INFO, p.info_text(p.INFO_NAME, export.name))
    if p.INFO_DESCRIPTION in request.items:
        await _reply_data(wire, option, p.REP_INFO, p.info_text(p.INFO_DESCRIPTION, export.description))
    await _reply_data(wire, option, p.REP_INFO, p.info_block_size(*export.block_sizes()))
    await _reply(wire, option, p.REP_ACK)
    if option == p.OPT_INFO:
        return False
    session.export = export
    if session.contexts_for != export.name:
        session.contexts = {}
    return True


async def _meta_context(wire: Wire, exports: Exports, session: Session, option: int,
                        request: p.MetaContextRequest) -> None:
    """LIST_META_CONTEXT answers the contexts the queries name (context id 0, as the protocol asks);
    SET_META_CONTEXT selects them, each with its id, for the export named."""
    if not session.structured:
        raise p.OptionError("negotiate structured replies first")
    export = exports.find(request.name)
    if export is None:
        await _reply(wire, option, p.REP_ERR_UNKNOWN, f"no export called {request.name!r}")
        return
    listing = option == p.OPT_LIST_META_CONTEXT
    names = select_contexts(request.queries, listing=listing)
    if not listing:
        session.contexts = {CONTEXT_IDS[name]: name for name in names}
        session.contexts_for = export.name
    for name in names:
        context_id = 0 if listing else CONTEXT_IDS[name]
        await _reply_data(wire, option, p.REP_META_CONTEXT, p.meta_context_entry(context_id, name))
    await _reply(wire, option, p.REP_ACK)
