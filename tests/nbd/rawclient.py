"""A minimal synchronous NBD client over a unix socket, for tests: fixed newstyle handshake, options, GO,
structured replies, requests and replies. It encodes everything itself (only the constants come from
vhdxfs.nbd.protocol), so a test can also send what a well-behaved client never would: a bad magic, an
option too long, a request header declaring more data than follows.

    with RawClient(server.socket) as c:
        c.handshake()
        c.structured_replies()
        c.go()
        cookie = c.request(p.CMD_READ, 0, 4096)
        reply = c.reply()          # Reply(cookie, error, data, ...)
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from vhdxfs.nbd import protocol as p

TIMEOUT = 10.0


class ServerClosed(Exception):
    """The server closed the connection where the client expected more bytes."""


@dataclass
class OptionReply:
    option: int
    type: int
    data: bytes

    @property
    def error(self) -> bool:
        return bool(self.type & (1 << 31))


@dataclass
class Export:
    """What NBD_OPT_GO (or INFO) told of an export."""

    size: int
    flags: int
    infos: list[bytes] = field(default_factory=list)  # every NBD_REP_INFO payload


@dataclass
class Reply:
    """A whole reply: simple, or the chunks of a structured one put together."""

    cookie: int
    error: int = 0
    data: bytes = b""  # a READ's bytes (its data chunks in offset order, holes as zeros)
    extents: list[tuple[int, int]] = field(default_factory=list)  # BLOCK_STATUS (length, flags)
    status: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # BLOCK_STATUS by context id
    chunks: list[tuple[int, int]] = field(default_factory=list)  # structured: (flags, type) of each chunk
    message: str = ""  # an error chunk's text


class OptionFailed(Exception):
    def __init__(self, reply: OptionReply) -> None:
        super().__init__(f"option {reply.option}: reply type 0x{reply.type:x} {reply.data!r}")
        self.reply = reply


# -- encodings of option data ---------------------------------------------------------------------------
def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(">I", len(raw)) + raw


def info_data(name: str | bytes = "", items: tuple[int, ...] = ()) -> bytes:
    """The data of NBD_OPT_INFO / NBD_OPT_GO."""
    return string(name) + struct.pack(f">H{len(items)}H", len(items), *items)


def meta_context_data(name: str | bytes = "", queries: tuple[str, ...] = ()) -> bytes:
    """The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def request_header(kind: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 0,
                   magic: int = p.REQUEST_MAGIC) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, kind, cookie, offset, length)


class RawClient:
    def __init__(self, path: str | Path, timeout: float = TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.handshake_flags = 0
        self.structured = False
        self.export: Export | None = None
        self._next_cookie = 1
        self._pending: dict[int, tuple[int, int, int]] = {}  # cookie -> (command, offset, length)
        self._partial: dict[int, Reply] = {}  # structured replies whose last chunk has not come yet

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- bytes --------------------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ServerClosed(f"the server closed the connection ({len(buf)} of {n} bytes read)")
            buf += chunk
        return bytes(buf)

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout`` (whatever it sends first is read
        and dropped); False when it is still open then."""
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(1 << 16):
                    return True
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
        return False

    # -- handshake ----------------------------------------------------------------------------------------
    def greeting(self) -> int:
        """Read the server's greeting; its handshake flags."""
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exactly(18))
        assert (magic, opt_magic) == (p.NBDMAGIC, p.IHAVEOPT), (hex(magic), hex(opt_magic))
        self.handshake_flags = flags
        return flags

    def handshake(self, client_flags: int = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES) -> None:
        """The greeting and the client's flags: what comes next is option haggling."""
        self.greeting()
        self.send(struct.pack(">I", client_flags))

    def send_option(self, option: int, data: bytes = b"", *, length: int | None = None,
                    magic: int = p.IHAVEOPT) -> None:
        """An option header and its data; ``length`` and ``magic`` may lie."""
        self.send(struct.pack(">QII", magic, option, len(data) if length is None else length) + data)

    def option_reply(self) -> OptionReply:
        magic, option, kind, length = struct.unpack(">QIII", self.recv_exactly(20))
        assert magic == p.OPTION_REPLY_MAGIC, hex(magic)
        return OptionReply(option, kind, self.recv_exactly(length))

    def option(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Send an option; every reply to it, up to and including the final one (ACK or an error)."""
        self.send_option(option, data)
        replies = []
        while True:
            reply = self.option_reply()
            assert reply.option == option, (reply.option, option)
            replies.append(reply)
            if reply.type == p.REP_ACK or reply.error:
                return replies

    def structured_replies(self) -> None:
        replies = self.option(p.OPT_STRUCTURED_REPLY)
        if replies[-1].type != p.REP_ACK:
            raise OptionFailed(replies[-1])
        self.structured = True

    def set_meta_context(self, queries: tuple[str, ...] = (p.BASE_ALLOCATION,), name: str = "") -> dict[int, str]:
        """The contexts the server selected: id -> name."""
        replies = self.option(p.OPT_SET_META_CONTEXT, meta_context_data(name, queries))
        if replies[-1].type != p.REP_ACK:
            raise OptionFailed(replies[-1])
        return {struct.unpack(">I", r.data[:4])[0]: r.data[4:].decode() for r in replies[:-1]}

    def list_meta_context(self, queries: tuple[str, ...] = (), name: str = "") -> list[tuple[int, str]]:
        """The contexts the server lists: (id, name) of each NBD_REP_META_CONTEXT."""
        replies = self.option(p.OPT_LIST_META_CONTEXT, meta_context_data(name, queries))
        if replies[-1].type != p.REP_ACK:
            raise OptionFailed(replies[-1])
        return [(struct.unpack(">I", r.data[:4])[0], r.data[4:].decode()) for r in replies[:-1]]

    def info(self, name: str = "", items: tuple[int, ...] = (), *, option: int = p.OPT_INFO) -> Export:
        """NBD_OPT_INFO (or GO): the export's size and flags; OptionFailed on an error reply."""
        replies = self.option(option, info_data(name, items))
        if replies[-1].type != p.REP_ACK:
            raise OptionFailed(replies[-1])
        export = Export(0, 0, [r.data for r in replies if r.type == p.REP_INFO])
        for data in export.infos:
            if struct.unpack(">H", data[:2])[0] == p.INFO_EXPORT:
                _, export.size, export.flags = struct.unpack(">HQH", data)
        return export

    def go(self, name: str = "", items: tuple[int, ...] = ()) -> Export:
        """NBD_OPT_GO: on success the connection is in transmission."""
        self.export = self.info(name, items, option=p.OPT_GO)
        return self.export

    def connect(self, *, structured: bool = False, meta_context: bool = False, name: str = "") -> Export:
        """Handshake, maybe structured replies and base:allocation, then GO: ready for requests."""
        self.handshake()
        if structured or meta_context:
            self.structured_replies()
        if meta_context:
            self.set_meta_context(name=name)
        return self.go(name)

    # -- transmission -------------------------------------------------------------------------------------
    def request(self, kind: int, offset: int = 0, length: int = 0, data: bytes = b"", *, flags: int = 0,
                cookie: int | None = None) -> int:
        """Send a request (a WRITE's ``data`` follows its header); its cookie. ``length`` defaults to the
        data's length."""
        if cookie is None:
            cookie, self._next_cookie = self._next_cookie, self._next_cookie + 1
        length = length or len(data)
        self._pending[cookie] = (kind, offset, length)
        self.send(request_header(kind, offset, length, flags=flags, cookie=cookie) + data)
        return cookie

    def reply(self) -> Reply:
        """The next whole reply (in the order the server completes them, not the order requests were sent)."""
        while True:
            (magic,) = struct.unpack(">I", self.recv_exactly(4))
            if magic == p.SIMPLE_REPLY_MAGIC:
                error, cookie = struct.unpack(">IQ", self.recv_exactly(12))
                kind, _, length = self._pending.pop(cookie)
                data = self.recv_exactly(length) if kind == p.CMD_READ and not error else b""
                return Reply(cookie, error, data)
            assert magic == p.STRUCTURED_REPLY_MAGIC, f"bad reply magic 0x{magic:x}"
            flags, kind, cookie, length = struct.unpack(">HHQI", self.recv_exactly(16))
            reply = self._chunk(cookie, flags, kind, self.recv_exactly(length))
            if flags & p.REPLY_FLAG_DONE:
                del self._partial[cookie]
                self._pending.pop(cookie)
                return reply

    def _chunk(self, cookie: int, flags: int, kind: int, payload: bytes) -> Reply:
        assert cookie in self._pending, f"a reply for cookie {cookie}, which is not in flight"
        reply = self._partial.setdefault(cookie, Reply(cookie))
        reply.chunks.append((flags, kind))
        _, start, length = self._pending[cookie]
        if kind == p.REPLY_TYPE_OFFSET_DATA:
            (offset,) = struct.unpack(">Q", payload[:8])
            reply.data = _place(reply.data, offset - start, payload[8:], length)
        elif kind == p.REPLY_TYPE_OFFSET_HOLE:
            offset, n = struct.unpack(">QI", payload)
            reply.data = _place(reply.data, offset - start, bytes(n), length)
        elif kind == p.REPLY_TYPE_BLOCK_STATUS:
            n = (len(payload) - 4) // 8
            (context_id,) = struct.unpack(">I", payload[:4])
            descriptors = list(struct.iter_unpack(">II", payload[4:4 + 8 * n]))
            reply.extents += descriptors
            reply.status.setdefault(context_id, []).extend(descriptors)
        elif kind & (1 << 15):  # an error chunk
            reply.error, n = struct.unpack(">IH", payload[:6])
            reply.message = payload[6:6 + n].decode(errors="replace")
        return reply

    def read(self, offset: int, length: int, *, flags: int = 0) -> Reply:
        self.request(p.CMD_READ, offset, length, flags=flags)
        return self.reply()

    def write(self, offset: int, data: bytes, *, flags: int = 0) -> Reply:
        self.request(p.CMD_WRITE, offset, data=data, flags=flags)
        return self.reply()

    def command(self, kind: int, offset: int = 0, length: int = 0, *, flags: int = 0) -> Reply:
        self.request(kind, offset, length, flags=flags)
        return self.reply()

    def disconnect(self) -> None:
        self.send(request_header(p.CMD_DISC))


def _place(data: bytes, at: int, part: bytes, total: int) -> bytes:
    buf = bytearray(data.ljust(total, b"\0"))
    buf[at:at + len(part)] = part
    return bytes(buf)
