"""The NBD target: vhdxfs/nbd/protocol.py's parsers fed a client's byte stream, and the transmission
phase's decisions taken before any I/O (vhdxfs/nbd/admission.py ``refusal`` and ``cost``, the seams
Transmission calls for every request).

The stream is read as the server reads it: the client flags, then option headers each followed by their
data (parsed as INFO/GO or LIST/SET_META_CONTEXT requests when the option says so, and the metadata
context queries matched as the server matches them), then request headers.
The documented errors are ProtocolError (the session ends) and OptionError (NBD_REP_ERR_INVALID); anything
else is a crash. What parses must re-encode to the very bytes it came from: nothing is lost or invented.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace

from vhdxfs.nbd import admission
from vhdxfs.nbd import protocol as p
from vhdxfs.nbd.exports import MAX_PAYLOAD
from vhdxfs.nbd.handshake import META_CONTEXTS, Session, select_contexts

from .patches import Reader

_INFO_OPTIONS = (p.OPT_INFO, p.OPT_GO)
_META_OPTIONS = (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT)


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">I", len(raw)) + raw


def _option(header: bytes, r: Reader) -> None:
    option, length = p.parse_option_header(header)
    data = r.take(min(length, 512))  # the fuzzer's inputs are short; longer options are cut, not skipped
    if option in _INFO_OPTIONS:
        info = p.parse_info_request(data)
        assert _string(info.name) + struct.pack(f">H{len(info.items)}H", len(info.items), *info.items) == data
    elif option in _META_OPTIONS:
        meta = p.parse_meta_context_request(data)
        encoded = _string(meta.name) + struct.pack(">I", len(meta.queries)) + b"".join(map(_string, meta.queries))
        assert encoded == data
        names = select_contexts(meta.queries, listing=option == p.OPT_LIST_META_CONTEXT)
        assert len(set(names)) == len(names) and set(names) <= set(META_CONTEXTS)
        assert option == p.OPT_LIST_META_CONTEXT or set(names) <= set(meta.queries)


def _request(header: bytes, flags: int) -> None:
    request = p.parse_request(header)
    assert p.REQUEST.pack(p.REQUEST_MAGIC, request.flags, request.type, request.cookie, request.offset,
                          request.length) == header
    session = Session(contexts={1: p.BASE_ALLOCATION, 2: p.ALLOCATION_DEPTH} if flags & 1 else {})
    export = SimpleNamespace(read_only=bool(flags & 2), size=(flags >> 2) * 512)  # admission.ExportLimits
    refusal = admission.refusal(request, export, session)
    assert refusal in (0, *p.WIRE_ERRORS)
    assert 0 <= admission.cost(request) <= MAX_PAYLOAD == 32 << 20


def nbd(data: bytes) -> None:
    r = Reader(data)
    mode = r.int(1)
    try:
        p.parse_client_flags(r.take(4))
    except p.ProtocolError:
        pass
    while r.more():
        kind = r.int(1)
        try:
            if kind % 2 == 0:
                header = r.take(p.OPTION_HEADER_SIZE)
                if kind & 2:  # most of the time a well-formed magic, so the fuzzer reaches the option data
                    header = struct.pack(">Q", p.IHAVEOPT) + header[8:]
                _option(header, r)
            else:
                header = r.take(p.REQUEST_SIZE)
                if kind & 2:
                    header = struct.pack(">I", p.REQUEST_MAGIC) + header[4:]
                _request(header, mode)
        except (p.ProtocolError, p.OptionError):
            pass
    p.utf8_prefix(data.decode(errors="replace"), mode * 16)
