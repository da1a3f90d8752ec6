"""vhdxfs/nbd/protocol.py on its own: what the builders make is what the protocol document describes (read
back with struct, not with the module's own parsers), the parsers read it back, and malformed input raises
ProtocolError (the session ends) or OptionError (answered NBD_REP_ERR_INVALID), never anything else.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.nbd.rawclient import info_data, meta_context_data, request_header
from vhdxfs.nbd import protocol as p

# -- handshake ------------------------------------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes():
    magic, opt_magic, flags = struct.unpack(">QQH", p.server_greeting())
    assert (magic, opt_magic) == (0x4E42444D41474943, 0x49484156454F5054)
    assert p.server_greeting()[:8] == b"NBDMAGIC" and p.server_greeting()[8:16] == b"IHAVEOPT"
    assert flags == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES


@pytest.mark.parametrize("flags", [0, 1, 2, 3])
def test_known_client_flags(flags):
    assert p.parse_client_flags(struct.pack(">I", flags)) == flags


@pytest.mark.parametrize("flags", [4, 1 << 31, 0xFFFFFFFF, 3 | 8])
def test_unknown_client_flags_end_the_session(flags):
    with pytest.raises(p.ProtocolError):
        p.parse_client_flags(struct.pack(">I", flags))


def test_option_header_round_trip():
    for option, length in [(p.OPT_GO, 0), (p.OPT_LIST, 7), (0xFFFFFFFF, p.MAX_OPTION_DATA)]:
        assert p.parse_option_header(struct.pack(">QII", p.IHAVEOPT, option, length)) == (option, length)
    assert p.OPTION_HEADER_SIZE == 16


def test_option_header_bad_magic():
    with pytest.raises(p.ProtocolError, match="magic"):
        p.parse_option_header(struct.pack(">QII", p.NBDMAGIC, p.OPT_GO, 0))


@pytest.mark.parametrize("length", [p.MAX_OPTION_DATA + 1, 1 << 20, 0xFFFFFFFF])
def test_option_longer_than_64k_ends_the_session(length):
    with pytest.raises(p.ProtocolError):
        p.parse_option_header(struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, length))


def test_option_reply_layout():
    reply = p.option_reply(p.OPT_GO, p.REP_ERR_UNKNOWN, b"no such export")
    assert struct.unpack(">QIII", reply[:20]) == (0x3E889045565A9, p.OPT_GO, (1 << 31) + 6, 14)
    assert reply[20:] == b"no such export"
    assert p.option_reply(p.OPT_ABORT, p.REP_ACK) == struct.pack(">QIII", p.OPTION_REPLY_MAGIC, 2, 1, 0)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_reply(no_zeroes):
    reply = p.export_name_reply(1 << 40, 0x1234, no_zeroes)
    assert struct.unpack(">QH", reply[:10]) == (1 << 40, 0x1234)
    assert reply[10:] == (b"" if no_zeroes else bytes(124))


def test_error_reply_types():
    assert [p.REP_ERR_UNSUP, p.REP_ERR_POLICY, p.REP_ERR_INVALID, p.REP_ERR_PLATFORM, p.REP_ERR_TLS_REQD,
            p.REP_ERR_UNKNOWN, p.REP_ERR_SHUTDOWN, p.REP_ERR_TOO_BIG] == [(1 << 31) + n for n in (1, 2, 3, 4, 5, 6,
                                                                                                    7, 9)]


# -- INFO / GO ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,items", [("", ()), ("disk", (p.INFO_NAME, p.INFO_BLOCK_SIZE)),
                                        ("é" * 100, (0, 1, 2, 3, 65535)), ("x" * p.MAX_STRING, ())])
def test_info_request_round_trip(name, items):
    assert p.parse_info_request(info_data(name, items)) == p.InfoRequest(name, items)


@pytest.mark.parametrize("data", [
    b"",  # no name length
    b"\0\0\0",  # name length cut short
    struct.pack(">I", 5) + b"disk",  # name cut short
    struct.pack(">I", 4) + b"disk",  # no request count
    struct.pack(">I", 4) + b"disk\0",  # request count cut short
    info_data("disk", (1, 2))[:-1],  # fewer requests than counted
    info_data("disk", (1, 2)) + b"\0",  # trailing byte
    info_data("disk", (1,)) + b"\0\0",  # more requests than counted
    info_data(b"\xff\xfe"),  # not UTF-8
    info_data("x" * (p.MAX_STRING + 1)),  # name longer than the protocol allows
    struct.pack(">I", 0xFFFFFFFF) + bytes(10),  # absurd name length
])
def test_malformed_info_request(data):
    with pytest.raises(p.OptionError):
        p.parse_info_request(data)


def test_info_export_layout():
    assert struct.unpack(">HQH", p.info_export(12345, 0x1FF)) == (p.INFO_EXPORT, 12345, 0x1FF)


def test_info_text_layout():
    data = p.info_text(p.INFO_NAME, "disk")
    assert struct.unpack(">H", data[:2]) == (p.INFO_NAME,) and data[2:] == b"disk"
    assert len(p.info_text(p.INFO_DESCRIPTION, "d" * 10000)) == 2 + p.MAX_STRING


def test_info_text_truncated_is_still_utf8():
    """A description longer than 4096 bytes is cut: the cut must not split a character (strings MUST be UTF-8)."""
    data = p.info_text(p.INFO_DESCRIPTION, "€" * 2000)  # 6000 bytes of 3-byte characters
    assert len(data) - 2 <= p.MAX_STRING
    data[2:].decode()


def test_info_block_size_layout():
    assert struct.unpack(">HIII", p.info_block_size(1, 4096, 32 << 20)) == (p.INFO_BLOCK_SIZE, 1, 4096, 32 << 20)


def test_server_entry_layout():
    entry = p.server_entry("disk", "a description")
    assert struct.unpack(">I", entry[:4]) == (4,) and entry[4:8] == b"disk" and entry[8:] == b"a description"
    assert p.server_entry("é") == struct.pack(">I", 2) + "é".encode()


# -- metadata contexts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,queries", [("", ()), ("disk", ("base:allocation",)),
                                          ("d", ("base:", "qemu:dirty-bitmap:x", "ü:ß")),
                                          ("", tuple(f"n:{i}" for i in range(64)))])
def test_meta_context_request_round_trip(name, queries):
    assert p.parse_meta_context_request(meta_context_data(name, queries)) == p.MetaContextRequest(name, queries)


@pytest.mark.parametrize("data", [
    b"",
    struct.pack(">I", 4) + b"disk",  # no query count
    struct.pack(">I", 4) + b"disk\0\0",  # query count cut short
    meta_context_data("disk", ("base:allocation",))[:-1],  # last query cut short
    meta_context_data("disk", ("base:allocation",)) + b"x",  # trailing bytes
    meta_context_data("", ("a:b", "c:d"))[:-4],  # the count says 2, one is there
    struct.pack(">I", 0) + struct.pack(">I", 65),  # too many queries
    meta_context_data("", ("a:b",))[:8] + struct.pack(">I", 3) + b"\xff\xfe\xfd",  # query not UTF-8
    meta_context_data("", ("q" * (p.MAX_STRING + 1),)),  # query too long
    meta_context_data(b"\xc3"),  # name not UTF-8
])
def test_malformed_meta_context_request(data):
    with pytest.raises(p.OptionError):
        p.parse_meta_context_request(data)


def test_meta_context_entry_layout():
    entry = p.meta_context_entry(7, p.BASE_ALLOCATION)
    assert struct.unpack(">I", entry[:4]) == (7,) and entry[4:] == b"base:allocation"


# -- transmission ---------------------------------------------------------------------------------------


def test_request_round_trip():
    header = request_header(p.CMD_WRITE, 1 << 40, 65536, flags=p.CMD_FLAG_FUA, cookie=0xDEADBEEFCAFEF00D)
    assert p.REQUEST_SIZE == len(header) == 28
    assert p.parse_request(header) == p.Request(p.CMD_FLAG_FUA, p.CMD_WRITE, 0xDEADBEEFCAFEF00D, 1 << 40, 65536)


@pytest.mark.parametrize("magic", [0, p.SIMPLE_REPLY_MAGIC, p.REQUEST_MAGIC ^ 1, 0xFFFFFFFF])
def test_request_bad_magic(magic):
    with pytest.raises(p.ProtocolError, match="magic"):
        p.parse_request(request_header(p.CMD_READ, magic=magic))


@pytest.mark.parametrize("parse,size", [(p.parse_request, p.REQUEST_SIZE), (p.parse_option_header, 16),
                                        (p.parse_client_flags, 4)])
def test_header_of_the_wrong_size_is_a_protocol_error(parse, size):
    """The callers always read exactly the header's size, but the module promises its documented exceptions
    for malformed input (it is what the fuzzers feed): a short or long header must not escape as struct.error."""
    for n in (0, size - 1, size + 1):
        with pytest.raises(p.ProtocolError):
            parse(bytes(n))


def test_allowed_flags_cover_every_command():
    assert set(p.ALLOWED_FLAGS) == {p.CMD_READ, p.CMD_WRITE, p.CMD_DISC, p.CMD_FLUSH, p.CMD_TRIM, p.CMD_CACHE,
                                    p.CMD_WRITE_ZEROES, p.CMD_BLOCK_STATUS}
    assert p.ALLOWED_FLAGS[p.CMD_READ] & p.CMD_FLAG_DF
    assert not p.ALLOWED_FLAGS[p.CMD_WRITE] & p.CMD_FLAG_DF
    assert p.ALLOWED_FLAGS[p.CMD_WRITE_ZEROES] & p.CMD_FLAG_FAST_ZERO
    assert p.ALLOWED_FLAGS[p.CMD_BLOCK_STATUS] & p.CMD_FLAG_REQ_ONE


def test_simple_reply_layout():
    assert struct.unpack(">IIQ", p.simple_reply(42)) == (0x67446698, 0, 42)
    assert struct.unpack(">IIQ", p.simple_reply(2**64 - 1, p.EINVAL)) == (p.SIMPLE_REPLY_MAGIC, 22, 2**64 - 1)


def _chunk(data: bytes) -> tuple[tuple[int, int, int, int, int], bytes]:
    return struct.unpack(">IHHQI", data[:20]), data[20:]


def test_data_chunk_header():
    header, rest = _chunk(p.data_chunk_header(9, 4096, 512, done=True))
    assert header == (0x668E33EF, p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, 9, 8 + 512)
    assert struct.unpack(">Q", rest) == (4096,)
    header, _ = _chunk(p.data_chunk_header(9, 0, 0, done=False))
    assert header[1] == 0


def test_hole_chunk():
    header, rest = _chunk(p.hole_chunk(3, 1 << 33, 1 << 20, done=False))
    assert header == (p.STRUCTURED_REPLY_MAGIC, 0, p.REPLY_TYPE_OFFSET_HOLE, 3, 12)
    assert struct.unpack(">QI", rest) == (1 << 33, 1 << 20)


def test_none_chunk():
    header, rest = _chunk(p.none_chunk(5))
    assert header == (p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_NONE, 5, 0) and rest == b""


@pytest.mark.parametrize("message", ["", "offset past the end", "x" * 10000])
def test_error_chunk(message):
    header, rest = _chunk(p.error_chunk(7, p.ENOSPC, message))
    text = message.encode()[:p.MAX_STRING]
    assert header == (p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_ERROR, 7, 6 + len(text))
    assert struct.unpack(">IH", rest[:6]) == (p.ENOSPC, len(text)) and rest[6:] == text


def test_error_chunk_truncated_message_is_still_utf8():
    """An error message over 4096 bytes is cut: the cut must not split a character (strings MUST be UTF-8)."""
    _, rest = _chunk(p.error_chunk(7, p.EIO, "€" * 2000))  # 6000 bytes of 3-byte characters
    (n,) = struct.unpack(">H", rest[4:6])
    assert n <= p.MAX_STRING
    rest[6:6 + n].decode()


def test_block_status_chunk():
    header, rest = _chunk(p.block_status_chunk(11, 1, [(65536, 0), (1 << 20, p.STATE_HOLE | p.STATE_ZERO)]))
    assert header == (p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_BLOCK_STATUS, 11, 4 + 16)
    assert struct.unpack(">IIIII", rest) == (1, 65536, 0, 1 << 20, 3)


def test_wire_errors_are_the_protocols():
    assert (p.EPERM, p.EIO, p.ENOMEM, p.EINVAL, p.ENOSPC, p.EOVERFLOW, p.ENOTSUP, p.ESHUTDOWN) == (
        1, 5, 12, 22, 28, 75, 95, 108)


# -- fuzz: arbitrary bytes give a value or one of the two documented exceptions -------------------------
FUZZ = settings(max_examples=500, deadline=None, database=None)


def _only_documented(parse, data: bytes):
    try:
        return parse(data)
    except (p.ProtocolError, p.OptionError):
        return None


@FUZZ
@given(st.binary(min_size=p.REQUEST_SIZE, max_size=p.REQUEST_SIZE))
def test_fuzz_parse_request(data):
    request = _only_documented(p.parse_request, data)
    if request is not None:
        assert data[:4] == struct.pack(">I", p.REQUEST_MAGIC)
        assert request_header(request.type, request.offset, request.length, flags=request.flags,
                              cookie=request.cookie) == data


@FUZZ
@given(st.one_of(st.binary(min_size=16, max_size=16),
                 st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)).map(
                     lambda t: struct.pack(">QII", p.IHAVEOPT, *t))))
def test_fuzz_parse_option_header(data):
    header = _only_documented(p.parse_option_header, data)
    if header is not None:
        assert header[1] <= p.MAX_OPTION_DATA
        assert struct.pack(">QII", p.IHAVEOPT, *header) == data


# Arbitrary bytes, and (more likely to get deep) valid requests with bytes mutated, cut or appended.
def _mutated(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    def mutate(args):
        data, at, byte, cut, extra = args
        buf = bytearray(data)
        if buf:
            buf[at % len(buf)] = byte
        return bytes(buf[:len(buf) - cut % (len(buf) + 1)] if cut else buf) + extra

    return st.tuples(valid, st.integers(0, 1 << 16), st.integers(0, 255), st.integers(0, 8),
                     st.binary(max_size=8)).map(mutate)


_names = st.one_of(st.text(max_size=20), st.binary(max_size=20))
_info = st.builds(info_data, _names, st.lists(st.integers(0, 65535), max_size=6).map(tuple))
_meta = st.builds(meta_context_data, _names, st.lists(st.text(max_size=12), max_size=5).map(tuple))


@FUZZ
@given(st.one_of(st.binary(max_size=256), _info, _mutated(_info)))
def test_fuzz_parse_info_request(data):
    request = _only_documented(p.parse_info_request, data)
    if request is not None:
        assert info_data(request.name, request.items) == data


@FUZZ
@given(st.one_of(st.binary(max_size=256), _meta, _mutated(_meta)))
def test_fuzz_parse_meta_context_request(data):
    request = _only_documented(p.parse_meta_context_request, data)
    if request is not None:
        assert len(request.queries) <= 64
        assert meta_context_data(request.name, request.queries) == data
