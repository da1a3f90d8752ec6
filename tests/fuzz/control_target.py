"""The control target: vhdxfs/service/control_protocol.py fed a client's byte stream, as the daemon reads it
(service/control.py): cut into lines, each parsed as a request and its arguments checked against the real
commands' parameters (engine/live/commands.py), every refusal turned into the error line the client gets;
and each line read as a daemon's message, as the CLI's client reads them.

The documented error is BadMessage (a VhdxError); anything else is a crash. Invariants: the lines do not
depend on how the stream is cut (nor does a refusal of an over-long one); what parses re-encodes to a
request that parses to the same; checked arguments have exactly their declared types; every error line is
one ASCII line that parses back as the error it was, with its class, errno and reason.
"""

from __future__ import annotations

import functools

from vhdxfs.engine.live import command_table
from vhdxfs.errors import VhdxError
from vhdxfs.service import control_protocol as cp

from .patches import Reader

TYPES = {"string": str, "size": int, "bool": bool}


@functools.cache
def _params() -> dict[str, dict[str, cp.Param]]:
    return {name: dict(command.params) for name, command in command_table([], dict).items()}


def _lines(data: bytes, limit: int, cuts: Reader | None) -> tuple[list[bytes], bool]:
    """The lines of ``data`` fed in pieces whose sizes ``cuts`` gives (all at once: None), and whether the
    reader refused them."""
    reader = cp.LineReader(limit)
    out: list[bytes] = []
    at = 0
    try:
        while at < len(data):
            n = 1 + cuts.int(1) % 64 if cuts is not None else len(data)
            out += reader.feed(data[at:at + n])
            at += n
    except cp.BadMessage:
        return out, True
    return out, False


def _refusal(exc: cp.BadMessage, rid: cp.RequestId) -> None:
    line = cp.error_reply(cp.error_of(exc), rid)
    assert line.isascii() and line.count(b"\n") == 1 and line.endswith(b"\n")
    message = cp.parse_message(line[:-1])
    assert message.kind == "error" and message.id == rid and message.value["class"] == exc.error_class
    again = cp.exception_of(message.value)
    assert isinstance(again, VhdxError) and again.errno == exc.errno and again.reason == exc.reason


def _request(line: bytes) -> None:
    try:
        request = cp.parse_request(line)
    except cp.BadMessage as exc:
        _refusal(exc, exc.request_id)
        return
    assert cp.parse_request(cp.request(request.command, request.arguments, request.id)[:-1]) == request
    params = _params().get(request.command)
    if params is None:
        return
    try:
        arguments = cp.check_arguments(request, params)
    except cp.BadMessage as exc:
        assert exc.error_class == cp.INVALID and exc.request_id == request.id
        _refusal(exc, request.id)
        return
    assert set(arguments) <= set(params)
    for name, value in arguments.items():
        assert type(value) is TYPES[params[name].kind], (name, value)
        if params[name].kind == "size":
            assert 0 <= value <= cp.MAX_INT


def control(data: bytes) -> None:
    r = Reader(data)
    limit = 16 + r.int(1) * 4  # small, so that the fuzzer reaches over-long lines within 1 KiB
    cuts = Reader(r.take(8))
    stream = data[r.at:]
    whole, refused = _lines(stream, limit, None)
    pieces, refused_in_pieces = _lines(stream, limit, cuts)
    assert refused == refused_in_pieces
    if not refused:
        assert whole == pieces
    for line in pieces:
        assert len(line) < limit and b"\n" not in line
        _request(line)
        try:
            cp.parse_message(line)
        except cp.BadMessage:
            pass
