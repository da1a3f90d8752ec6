"""The NBD protocol's messages (fixed newstyle), parsed and built without I/O.

Everything here works on bytes: the handshake and transmission code (handshake.py, transmission.py)
read and write them on a trio stream, and the fuzzer feeds this module directly. Names and numbers are
the protocol document's (NetworkBlockDevice/nbd, doc/proto.md); docs/nbd.md ("Protocol coverage") says which
parts vhdxfs implements.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# -- handshake ------------------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags (sent with the export's size).
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

# -- transmission ---------------------------------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# The command flags each command accepts (others: EINVAL).
ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REPLY_TYPE_BLOCK_STATUS = 0, 1, 2, 5
REPLY_TYPE_ERROR = (1 << 15) + 1

STATE_HOLE, STATE_ZERO = 1 << 0, 1 << 1  # base:allocation's flags
BASE_ALLOCATION = "base:allocation"  # the protocol's metadata context: NBD_STATE_HOLE and NBD_STATE_ZERO
ALLOCATION_DEPTH = "qemu:allocation-depth"  # QEMU's (interop/nbd.txt): the depth of the layer holding an extent
MAX_QUERIES = 64  # of one LIST or SET_META_CONTEXT: more are answered NBD_REP_ERR_TOO_BIG

# Errors on the wire (the protocol's, which happen to be Linux errnos).
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
WIRE_ERRORS = {EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN}

MAX_OPTION_DATA = 64 << 10  # an option longer than this is hostile: the session ends
MAX_STRING = 4096  # the protocol's limit on names and queries

_OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length


class ProtocolError(Exception):
    """The peer broke the protocol so that the session cannot go on (bad magic, an option too long...)."""


class OptionError(Exception):
    """An option's data is malformed: answered with NBD_REP_ERR_INVALID, the session goes on."""


class TooBig(OptionError):
    """An option asks for more than the server takes at once: answered NBD_REP_ERR_TOO_BIG, the session goes on."""


# -- handshake messages ---------------------------------------------------------------------------------
def server_greeting() -> bytes:
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def _whole(data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise ProtocolError(f"{what}: {len(data)} bytes, not {size}")


def utf8_prefix(text: str, limit: int = MAX_STRING) -> bytes:
    """``text`` as UTF-8, cut to at most ``limit`` bytes without splitting a character."""
    return text.encode()[:limit].decode(errors="ignore").encode()


def parse_client_flags(data: bytes) -> int:
    _whole(data, 4, "client flags")
    flags: int = struct.unpack(">I", data)[0]
    if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
        raise ProtocolError(f"unknown client flags 0x{flags:x}")
    return flags


OPTION_HEADER_SIZE = _OPTION_HEADER.size


def parse_option_header(data: bytes) -> tuple[int, int]:
    """(option, length of its data) from the 16-byte option header."""
    _whole(data, _OPTION_HEADER.size, "option header")
    magic, option, length = _OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic 0x{magic:x}")
    if length > MAX_OPTION_DATA:
        raise ProtocolError(f"option {option} carries {length} bytes, more than {MAX_OPTION_DATA}")
    return option, length


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The answer to NBD_OPT_EXPORT_NAME: size, transmission flags, maybe 124 zero bytes."""
    return struct.pack(">QH", size, flags) + (b"" if no_zeroes else bytes(124))


def _string(data: bytes, at: int, what: str) -> tuple[str, int]:
    """A 32-bit length and that many bytes of UTF-8 at ``at``; the text and where it ends."""
    if at + 4 > len(data):
        raise OptionError(f"{what}: length field cut short")
    (n,) = struct.unpack_from(">I", data, at)
    if n > MAX_STRING or at + 4 + n > len(data):
        raise OptionError(f"{what}: {n} bytes do not fit the option")
    try:
        return data[at + 4:at + 4 + n].decode(), at + 4 + n
    except UnicodeDecodeError:
        raise OptionError(f"{what}: not UTF-8") from None


@dataclass(frozen=True)
class InfoRequest:
    """NBD_OPT_INFO / NBD_OPT_GO: the export's name and the information items asked for."""

    name: str
    items: tuple[int, ...]


def parse_info_request(data: bytes) -> InfoRequest:
    name, at = _string(data, 0, "export name")
    if at + 2 > len(data):
        raise OptionError("information request count missing")
    (count,) = struct.unpack_from(">H", data, at)
    at += 2
    if at + 2 * count != len(data):
        raise OptionError(f"{count} information requests do not match the option's length")
    return InfoRequest(name, struct.unpack_from(f">{count}H", data, at))


@dataclass(frozen=True)
class MetaContextRequest:
    """NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: the export and the queries."""

    name: str
    queries: tuple[str, ...]


def parse_meta_context_request(data: bytes) -> MetaContextRequest:
    name, at = _string(data, 0, "export name")
    if at + 4 > len(data):
        raise OptionError("query count missing")
    (count,) = struct.unpack_from(">I", data, at)
    at += 4
    if count > MAX_QUERIES:
        raise TooBig(f"{count} queries: at most {MAX_QUERIES} are taken at once")
    queries = []
    for i in range(count):
        query, at = _string(data, at, f"query {i + 1}")
        queries.append(query)
    if at != len(data):
        raise OptionError("bytes after the last query")
    return MetaContextRequest(name, tuple(queries))


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_text(kind: int, text: str) -> bytes:
    return struct.pack(">H", kind) + utf8_prefix(text)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def server_entry(name: str, description: str = "") -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + description.encode()


def meta_context_entry(context_id: int, name: str) -> bytes:
    return struct.pack(">I", context_id) + name.encode()


# -- transmission messages ------------------------------------------------------------------------------
REQUEST_SIZE = REQUEST.size


@dataclass(frozen=True, slots=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def parse_request(data: bytes) -> Request:
    """A request header (28 bytes); a bad magic ends the session (nothing after it can be trusted)."""
    _whole(data, REQUEST.size, "request header")
    magic, flags, kind, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic 0x{magic:x}")
    return Request(flags, kind, cookie, offset, length)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie: int, kind: int, payload_length: int, *, done: bool) -> bytes:
    """A structured reply chunk's header; the payload follows it."""
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, kind, cookie, payload_length)


def data_chunk_header(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    """NBD_REPLY_TYPE_OFFSET_DATA for ``length`` bytes at ``offset`` (the data follows)."""
    return chunk(cookie, REPLY_TYPE_OFFSET_DATA, 8 + length, done=done) + struct.pack(">Q", offset)


def hole_chunk(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    return chunk(cookie, REPLY_TYPE_OFFSET_HOLE, 12, done=done) + struct.pack(">QI", offset, length)


def none_chunk(cookie: int) -> bytes:
    return chunk(cookie, REPLY_TYPE_NONE, 0, done=True)


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    text = utf8_prefix(message)
    return chunk(cookie, REPLY_TYPE_ERROR, 6 + len(text), done=True) + struct.pack(">IH", error, len(text)) + text


def block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]], *, done: bool = True) -> bytes:
    """NBD_REPLY_TYPE_BLOCK_STATUS: (length, flags) descriptors of one metadata context (one chunk each)."""
    body = struct.pack(">I", context_id) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return chunk(cookie, REPLY_TYPE_BLOCK_STATUS, len(body), done=done) + body
