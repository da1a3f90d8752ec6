"""The control channel's protocol without I/O (vhdxfs/service/control_protocol.py): lines, requests,
arguments, replies, and the errors a client gets back as the VhdxError they were."""

from __future__ import annotations

import errno
import json

import pytest

from vhdxfs.errors import ImageLockedError, Reason, VhdxError
from vhdxfs.service import control_protocol as cp

PARAMS = {"image": cp.Param("string"), "size": cp.Param("size", True), "shrink": cp.Param("bool")}


def test_lines_are_cut_whatever_the_chunks():
    stream = b'{"execute":"status"}\r\n\n{"execute":"x","id":1}\n{"exe'
    whole = cp.LineReader().feed(stream)
    reader = cp.LineReader()
    pieces = [line for i in range(len(stream)) for line in reader.feed(stream[i:i + 1])]
    assert whole == pieces == [b'{"execute":"status"}', b"", b'{"execute":"x","id":1}']


@pytest.mark.parametrize("chunks", [[b"x" * cp.MAX_LINE], [b"x" * 100, b"y" * cp.MAX_LINE + b"\n"],
                                    [b"x" * cp.MAX_LINE + b"\n"]])
def test_a_line_longer_than_the_limit_is_refused(chunks):
    reader = cp.LineReader()
    with pytest.raises(cp.BadMessage) as refused:
        for chunk in chunks:
            reader.feed(chunk)
    assert refused.value.error_class == cp.BAD_REQUEST and refused.value.errno == errno.EINVAL


def test_a_line_of_exactly_the_limit_is_fine():
    line = b'{"execute":"' + b"a" * (cp.MAX_LINE - 15) + b'"}\n'
    assert len(line) == cp.MAX_LINE
    assert cp.LineReader().feed(line) == [line[:-1]]


def test_a_request_parses_and_comes_back_the_same():
    request = cp.parse_request(cp.request("resize", {"size": "10G", "shrink": True}, 7))
    assert request == cp.Request("resize", {"size": "10G", "shrink": True}, 7)
    assert cp.check_arguments(request, PARAMS) == {"size": 10 << 30, "shrink": True}


@pytest.mark.parametrize("line,error_class,rid", [
    (b"garbage", cp.BAD_REQUEST, None),
    (b"\xff\xfe{}", cp.BAD_REQUEST, None),
    (b"[1, 2]", cp.BAD_REQUEST, None),
    (b'{"execute": 5, "id": "a"}', cp.BAD_REQUEST, "a"),
    (b'{"execute": "status", "argument": {}, "id": 3}', cp.BAD_REQUEST, 3),
    (b'{"execute": "status", "arguments": [], "id": 4}', cp.INVALID, 4),
    (b'{"execute": "status", "id": {"a": 1}}', cp.BAD_REQUEST, None),
    (b'{"execute": "status", "id": true}', cp.BAD_REQUEST, None),
    (b'{"execute": "status", "id": NaN}', cp.BAD_REQUEST, None),
    (b"[" * 60000, cp.BAD_REQUEST, None),
    (b"1" * 5000, cp.BAD_REQUEST, None),
])
def test_what_is_not_a_request_is_told_so(line, error_class, rid):
    with pytest.raises(cp.BadMessage) as refused:
        cp.parse_request(line)
    assert (refused.value.error_class, refused.value.request_id) == (error_class, rid)


@pytest.mark.parametrize("arguments,words", [
    ({}, "missing argument 'size'"),
    ({"size": 1, "colour": "red"}, "unknown argument 'colour'"),
    ({"size": True}, "size must be a byte count"),
    ({"size": -1}, "size must be a byte count"),
    ({"size": 1 << 63}, "size must be a byte count"),
    ({"size": 1.5}, "size must be a byte count"),
    ({"size": "lots"}, "is not a size"),
    ({"size": 1, "shrink": "yes"}, "shrink must be true or false"),
    ({"size": 1, "image": 7}, "image must be a string"),
    ({"size": 1, "image": "a\0b"}, "without NUL"),
    ({"size": 1, "image": ""}, "without NUL"),
    ({"size": 1, "image": "x" * 5000}, "without NUL"),
    ({"size": 1, "image": "\ud800"}, "lone surrogate"),
])
def test_wrong_arguments_are_invalid(arguments, words):
    with pytest.raises(cp.BadMessage) as refused:
        cp.check_arguments(cp.Request("resize", arguments, 1), PARAMS)
    assert refused.value.error_class == cp.INVALID and words in str(refused.value)
    assert refused.value.request_id == 1


def test_a_file_name_that_is_not_utf8_travels_and_comes_back():
    name = b"disk\xff.vhdx".decode("utf-8", "surrogateescape")
    line = cp.request("checkpoint", {"image": name})
    assert line.isascii()
    request = cp.parse_request(line)
    assert cp.check_arguments(request, PARAMS | {"size": cp.Param("size")}) == {"image": name}


def test_an_engine_error_reaches_the_client_whole():
    error = ImageLockedError("in use by the vhdxfs mount daemon 12 at /mnt", path="/srv/disk.vhdx")
    message = cp.parse_message(cp.error_reply(cp.error_of(error), 9))
    assert (message.kind, message.id, message.value["class"]) == ("error", 9, cp.FAILED)
    again = cp.exception_of(message.value)
    assert str(again) == str(error) and again.path == "/srv/disk.vhdx"
    assert (again.errno, again.reason) == (errno.EBUSY, Reason.LOCKED)


def test_a_bug_is_internal_and_says_where_to_look():
    error = cp.error_of(KeyError("x"))
    assert error["class"] == cp.INTERNAL and "daemon's log" in error["desc"]
    assert cp.exception_of(error).reason == Reason.INTERNAL


def test_what_a_client_reads():
    assert cp.parse_message(cp.greeting({"pid": 1})).value == {"protocol": cp.PROTOCOL, "pid": 1}
    event = cp.parse_message(cp.event("progress", {"done-bytes": 5}, "m"))
    assert (event.kind, event.event, event.value, event.id) == ("event", "progress", {"done-bytes": 5}, "m")
    assert cp.parse_message(cp.reply({"a": [1]}, 2)) == cp.Message("return", {"a": [1]}, 2)
    for bad in (b"{}", b"[]", b'{"error": "x"}', b'{"event": 1}', b'{"vhdxfs": 3}'):
        with pytest.raises(cp.BadMessage):
            cp.parse_message(bad)


def test_odd_errnos_and_reasons_from_a_daemon_stay_harmless():
    err = cp.exception_of({"desc": "x", "errno": "EBUSY", "reason": "no-such-reason"})
    assert isinstance(err, VhdxError) and err.errno == errno.EIO and err.reason == Reason.INTERNAL


def test_messages_are_one_ascii_line():
    line = cp.reply({"path": "/tmp/\u00e9\nx", "n": 1 << 62})
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and line.isascii()
    assert json.loads(line)["return"]["path"] == "/tmp/\u00e9\nx"
