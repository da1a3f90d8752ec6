"""Hostile and broken clients against a real `vhdxfs serve` daemon.

Each test talks to the server with tests/nbd/rawclient.py, which can send what a well-behaved client never
would. What the protocol lets the server answer is answered (NBD_REP_ERR_* in the handshake, an error reply
in transmission) and the connection goes on; what it cannot (a bad magic, unknown client flags, an option or
a WRITE too large to skip) ends that connection only. After every hostile client a good one (qemu-io) reads
and writes on the same server, and once the server has stopped the image checks clean (`vhdxfs check`).
The memory tests hold the daemon to 256 MiB RSS whatever a client queues (on one connection or several);
a client that has left, or stopped reading, must not cost the server CPU time or hold up its stop.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator

import pytest

from tests.helpers import make_image, vhdxfs
from tests.nbd.rawclient import (
    OptionFailed,
    RawClient,
    ServerClosed,
    info_data,
    meta_context_data,
    request_header,
    string,
)
from vhdxfs.engine import Disk
from vhdxfs.nbd import protocol as p
from vhdxfs.nbd.server import ServeConfig, address_key, state_file
from vhdxfs.service.records import read_record

KiB, MiB = 1 << 10, 1 << 20
SIZE = 64 * MiB
MAX_PAYLOAD = 32 * MiB
GOOD_OFFSET = SIZE - MiB  # where the good client writes; the hostile ones keep away from it
RSS_LIMIT = 256 * MiB


# -- the server, the good client, the check ---------------------------------------------------------------
@pytest.fixture(autouse=True)
def bounded_stop(monkeypatch):
    """A server wedged by a hostile client fails its test within seconds, not after `vhdxfs stop`'s 10 minutes."""
    monkeypatch.setenv("VHDXFS_STOP_TIMEOUT", "30")


def good_client(server, pattern: int = 0x5A) -> None:
    """qemu-io writes, reads back and verifies a pattern on the same server."""
    try:
        result = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {GOOD_OFFSET} 64k",
                                 "-c", f"read -P {pattern} {GOOD_OFFSET} 64k", "-c", "read 0 64k", server.uri()],
                                capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the good client (qemu-io) got no answer from the server within 30 s")
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "failed" not in out.lower() and "error" not in out.lower(), out


def check_clean(image) -> None:
    result = vhdxfs("check", image)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def image(tmp_path):
    return make_image(tmp_path / "disk.vhdx", SIZE)


@contextlib.contextmanager
def hosted(serve, image, *args: str) -> Iterator:
    """A server for hostile clients: afterwards a good client still works on it, and once stopped the image
    checks clean."""
    with serve(image, *args) as server:
        yield server
        good_client(server)
    check_clean(image)


@pytest.fixture
def server(serve, image):
    with hosted(serve, image) as s:
        yield s


def connected(server, **kw) -> RawClient:
    client = RawClient(server.socket)
    client.connect(**kw)
    return client


def assert_disconnected(client: RawClient, timeout: float = 5.0) -> None:
    assert client.closed_by_server(timeout), f"the server did not disconnect within {timeout} s"


def send_ignoring_close(client: RawClient, data: bytes) -> None:
    """Send what the server may stop reading halfway (it disconnects)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        client.send(data)


# -- handshake ------------------------------------------------------------------------------------------
def test_bad_option_magic(server):
    with RawClient(server.socket) as c:
        c.handshake()
        c.send_option(p.OPT_GO, info_data(), magic=p.NBDMAGIC)
        assert_disconnected(c)


def test_unknown_client_flags(server):
    for flags in [1 << 2, p.FLAG_C_FIXED_NEWSTYLE | 1 << 31, 0xFFFFFFFF]:
        with RawClient(server.socket) as c:
            c.handshake(client_flags=flags)
            assert_disconnected(c)


def test_option_longer_than_64k(server):
    with RawClient(server.socket) as c:  # exactly 64 KiB is still an option: answered, the session goes on
        c.handshake()
        [reply] = c.option(999, bytes(p.MAX_OPTION_DATA))
        assert reply.type == p.REP_ERR_UNSUP
        c.go()
        assert c.read(0, 512).error == 0
    with RawClient(server.socket) as c:
        c.handshake()
        c.send_option(p.OPT_GO, length=p.MAX_OPTION_DATA + 1)
        send_ignoring_close(c, bytes(p.MAX_OPTION_DATA + 1))
        assert_disconnected(c)
    with RawClient(server.socket) as c:  # a length that would need 4 GiB: no waiting for it
        c.handshake()
        c.send_option(p.OPT_INFO, length=0xFFFFFFFF)
        assert_disconnected(c)


def test_unknown_options_are_unsupported_and_negotiation_goes_on(server):
    with RawClient(server.socket) as c:
        c.handshake()
        for option, data in [(0, b""), (4, b""), (11, b"x"), (12, bytes(100)), (999, b"\xff" * 7),
                             (0xFFFFFFFF, b""), (1 << 31, info_data())]:
            [reply] = c.option(option, data)
            assert (reply.option, reply.type) == (option, p.REP_ERR_UNSUP), reply
        [reply] = c.option(p.OPT_STARTTLS)  # no TLS configured: refused, not a hang
        assert reply.type in (p.REP_ERR_POLICY, p.REP_ERR_UNSUP), reply
        listing = c.option(p.OPT_LIST)
        assert [r.type for r in listing] == [p.REP_SERVER, p.REP_ACK]
        assert listing[0].data[4:8] == b"disk"
        c.structured_replies()
        assert c.set_meta_context() == {1: p.BASE_ALLOCATION}
        export = c.go("disk", (p.INFO_BLOCK_SIZE,))
        assert export.size == SIZE
        assert c.read(0, 4096).data == bytes(4096)
        assert c.command(p.CMD_BLOCK_STATUS, 0, MiB).extents == [(MiB, p.STATE_HOLE | p.STATE_ZERO)]


MALFORMED_OPTIONS = [
    (p.OPT_INFO, b""),  # no name
    (p.OPT_INFO, info_data("disk")[:-1]),  # request count cut short
    (p.OPT_GO, info_data("disk", (p.INFO_NAME,)) + b"\0"),  # a trailing byte
    (p.OPT_GO, info_data("disk", (1, 2, 3))[:-2]),  # fewer requests than counted
    (p.OPT_GO, info_data(b"\xff\xfe")),  # name not UTF-8
    (p.OPT_GO, string("x" * (p.MAX_STRING + 1)) + b"\0\0"),  # name too long
    (p.OPT_GO, b"\xff\xff\xff\xff" + bytes(20)),  # a name length past the option's end
    (p.OPT_LIST, b"x"),  # takes no data
    (p.OPT_STRUCTURED_REPLY, b"\0"),  # takes no data
    (p.OPT_SET_META_CONTEXT, meta_context_data("", (p.BASE_ALLOCATION,))),  # before structured replies
]


def test_malformed_info_and_go_are_invalid_and_negotiation_goes_on(server):
    with RawClient(server.socket) as c:
        c.handshake()
        for option, data in MALFORMED_OPTIONS:
            [reply] = c.option(option, data)
            assert (reply.option, reply.type) == (option, p.REP_ERR_INVALID), (option, data[:20], reply)
        c.structured_replies()
        for data in [meta_context_data("", ("nonamespace",)), meta_context_data("", ("a:b",))[:-1]]:
            [reply] = c.option(p.OPT_SET_META_CONTEXT, data)
            assert reply.type == p.REP_ERR_INVALID, (data[:20], reply)
        [reply] = c.option(p.OPT_SET_META_CONTEXT, meta_context_data("", tuple(f"x:{i}" for i in range(65))))
        assert reply.type == p.REP_ERR_TOO_BIG, reply  # more queries than the server takes at once
        assert c.info().size == SIZE  # INFO does not enter transmission
        c.go()
        assert c.write(0, b"after the malformed options" * 100).error == 0
        assert c.read(0, 2700).data == b"after the malformed options" * 100


def test_go_to_an_unknown_export(server):
    with RawClient(server.socket) as c:
        c.handshake()
        for name in ["nope", "disk.vhdx", "DISK", "disk\0"]:
            for option in (p.OPT_INFO, p.OPT_GO):
                with pytest.raises(OptionFailed) as failed:
                    c.info(name, option=option)
                assert failed.value.reply.type == p.REP_ERR_UNKNOWN, (name, failed.value.reply)
        [reply] = c.option(p.OPT_SET_META_CONTEXT, meta_context_data("nope", (p.BASE_ALLOCATION,)))
        assert reply.type in (p.REP_ERR_INVALID, p.REP_ERR_UNKNOWN)  # (structured replies are not on)
        assert c.go("disk").size == SIZE
        assert c.read(0, 512).error == 0
    with RawClient(server.socket) as c:  # NBD_OPT_EXPORT_NAME cannot be answered with an error: disconnect
        c.handshake()
        c.send_option(p.OPT_EXPORT_NAME, b"nope")
        assert_disconnected(c)
    with RawClient(server.socket) as c:  # ... and the old way to a known export still works
        c.handshake()
        c.send_option(p.OPT_EXPORT_NAME, b"disk")
        size, flags = int.from_bytes(c.recv_exactly(8), "big"), int.from_bytes(c.recv_exactly(2), "big")
        assert size == SIZE and flags & p.TFLAG_HAS_FLAGS
        assert c.read(0, 512).error == 0


def test_error_messages_fit_the_string_limit(server):
    """Option error replies carry a message; strings on the wire MUST be at most 4096 bytes, even when the
    message quotes a client's 4096-byte export name or query."""
    with RawClient(server.socket) as c:
        c.handshake()
        with pytest.raises(OptionFailed) as failed:
            c.info("n" * p.MAX_STRING)
        assert failed.value.reply.type == p.REP_ERR_UNKNOWN
        message_length = len(failed.value.reply.data)
        assert message_length <= p.MAX_STRING
        c.structured_replies()
        [reply] = c.option(p.OPT_SET_META_CONTEXT, meta_context_data("", ("q" * p.MAX_STRING,)))
        assert reply.type == p.REP_ERR_INVALID
        message_length = len(reply.data)
        assert message_length <= p.MAX_STRING


def test_handshake_that_never_finishes(serve, image):
    with hosted(serve, image, "--handshake-timeout", "1") as server:
        start = time.monotonic()
        silent = RawClient(server.socket)  # connects and never says a word
        flags_only = RawClient(server.socket)
        flags_only.handshake()
        trickle = RawClient(server.socket)  # keeps haggling, never chooses: the limit is on the whole handshake
        trickle.handshake()
        with silent, flags_only, trickle:
            with pytest.raises((ServerClosed, BrokenPipeError, ConnectionResetError)):
                while time.monotonic() - start < 5:
                    trickle.option(999)
                    time.sleep(0.1)
            elapsed = time.monotonic() - start
            assert 0.8 < elapsed < 3, elapsed
            assert_disconnected(silent, 3)
            assert_disconnected(flags_only, 3)
            assert time.monotonic() - start < 3


# -- transmission ---------------------------------------------------------------------------------------
def test_bad_request_magic(server):
    with connected(server) as c:
        assert c.read(0, 512).error == 0
        send_ignoring_close(c, request_header(p.CMD_READ, 0, 512, cookie=1, magic=p.SIMPLE_REPLY_MAGIC))
        assert_disconnected(c)
    with connected(server, structured=True) as c:
        send_ignoring_close(c, b"\0" * 28)
        assert_disconnected(c)


def test_unknown_command(server):
    for structured in (False, True):
        with connected(server, structured=structured) as c:
            for kind in (8, 9, 100, 0xFFFF):
                assert c.command(kind, 0, 512).error == p.EINVAL, kind
            assert c.command(42, 0, 0, flags=p.CMD_FLAG_FUA).error == p.EINVAL
            assert c.write(0, b"still here").error == 0
            assert c.read(0, 10).data == b"still here"


def test_unknown_command_flags(server):
    for structured in (False, True):
        with connected(server, structured=structured) as c:
            assert c.read(0, 512, flags=1 << 7).error == p.EINVAL
            assert c.read(0, 512, flags=1 << 15).error == p.EINVAL
            assert c.command(p.CMD_FLUSH, flags=p.CMD_FLAG_REQ_ONE).error == p.EINVAL
            assert c.command(p.CMD_TRIM, 0, 4096, flags=p.CMD_FLAG_NO_HOLE).error == p.EINVAL
            assert c.command(p.CMD_CACHE, 0, 4096, flags=p.CMD_FLAG_FUA).error == p.EINVAL
            # A refused WRITE's data is still read and dropped: the next request is parsed where it starts.
            at = (2 + structured) * MiB
            assert c.write(at, b"\xee" * 4096, flags=p.CMD_FLAG_DF).error == p.EINVAL
            assert c.write(at, b"\xee" * 4096, flags=1 << 9).error == p.EINVAL
            assert c.read(at, 4096).data == bytes(4096)
            assert c.write(at, b"\x11" * 4096, flags=p.CMD_FLAG_FUA).error == 0
            assert c.read(at, 4096).data == b"\x11" * 4096


def test_requests_past_the_end(server):
    for structured in (False, True):
        with connected(server, meta_context=structured) as c:
            for offset, length in [(SIZE - 512, 1024), (SIZE, 1), (SIZE + MiB, 512), (1 << 63, 512),
                                   (2**64 - 1, 1), (2**64 - 512, 1024)]:
                assert c.read(offset, length).error == p.EINVAL, (offset, length)
                assert c.command(p.CMD_TRIM, offset, length).error == p.EINVAL, (offset, length)
                assert c.command(p.CMD_CACHE, offset, length).error == p.EINVAL, (offset, length)
                if structured:
                    assert c.command(p.CMD_BLOCK_STATUS, offset, length).error == p.EINVAL, (offset, length)
                assert c.write(offset, b"\xee" * length).error == p.ENOSPC, (offset, length)
                assert c.command(p.CMD_WRITE_ZEROES, offset, length).error == p.ENOSPC, (offset, length)
            assert c.command(p.CMD_TRIM, 0, 0xFFFFFFFF).error == p.EINVAL  # longer than the disk
            assert c.read(SIZE - 512, 512).error == 0  # up to the end is fine
            assert c.write(SIZE - 512, bytes([structured]) * 512).error == 0
            assert c.read(SIZE - 512, 512).data == bytes([structured]) * 512
            assert c.read(SIZE, 0).error == 0


def test_read_longer_than_the_maximum_payload(server):
    with connected(server) as c:
        assert c.read(0, MAX_PAYLOAD + 1).error == p.EINVAL
        assert c.read(0, 0xFFFFFFFF).error == p.EINVAL
        assert c.read(0, MAX_PAYLOAD).data == bytes(MAX_PAYLOAD)  # the maximum itself is served
    with connected(server, structured=True) as c:
        assert c.export.flags & p.TFLAG_SEND_DF
        assert c.read(0, MAX_PAYLOAD + 1).error == p.EINVAL
        assert c.read(0, MAX_PAYLOAD + 1, flags=p.CMD_FLAG_DF).error == p.EOVERFLOW
        assert c.read(0, 0xFFFFFFFF, flags=p.CMD_FLAG_DF).error == p.EOVERFLOW
        reply = c.read(MiB, 4096, flags=p.CMD_FLAG_DF)
        assert reply.error == 0 and reply.data == bytes(4096) and len(reply.chunks) == 1


def test_write_header_larger_than_the_maximum_payload(server, image):
    with connected(server) as c:
        assert c.write(0, b"\x33" * 4096).error == 0
        send_ignoring_close(c, request_header(p.CMD_WRITE, 0, MAX_PAYLOAD + 1, cookie=9) + b"\xee" * MiB)
        assert_disconnected(c)
    with connected(server, structured=True) as c:
        send_ignoring_close(c, request_header(p.CMD_WRITE, 0, 0xFFFFFFFF, cookie=9))
        assert_disconnected(c)
        with connected(server) as c2:
            assert c2.read(0, 4096).data == b"\x33" * 4096


def test_block_status_without_a_metadata_context(server):
    for contexts in (None, ("other:thing",)):
        with RawClient(server.socket) as c:
            c.handshake()
            c.structured_replies()
            if contexts:
                assert c.set_meta_context(contexts) == {}  # asked, but nothing selected
            c.go()
            assert c.command(p.CMD_BLOCK_STATUS, 0, MiB).error == p.EINVAL
            assert c.command(p.CMD_BLOCK_STATUS, 0, MiB, flags=p.CMD_FLAG_REQ_ONE).error == p.EINVAL
            assert c.read(0, 512).error == 0
    with connected(server) as c:  # without structured replies at all
        assert c.command(p.CMD_BLOCK_STATUS, 0, MiB).error == p.EINVAL
        assert c.read(0, 512).error == 0


def test_zero_length_requests(server):
    """The protocol leaves a zero length's effect to the server but forbids some answers: a structured READ's
    chunks must each describe at least one byte (OFFSET_DATA: length at least 9), and a successful
    BLOCK_STATUS must return at least one descriptor. Whatever the answer, the connection goes on."""
    with connected(server) as c:
        for kind in (p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES, p.CMD_CACHE):
            assert c.command(kind, MiB, 0).error in (0, p.EINVAL), kind
        assert c.read(MiB, 4).data == bytes(4)
    with connected(server, meta_context=True) as c:
        reply = c.read(MiB, 0)
        assert reply.data == b"" and (reply.error or reply.chunks == [(p.REPLY_FLAG_DONE, p.REPLY_TYPE_NONE)]), reply
        reply = c.command(p.CMD_BLOCK_STATUS, MiB, 0)
        assert reply.error or reply.extents, reply
        assert c.read(MiB, 4).data == bytes(4)


def test_disconnect_in_the_middle_of_a_write(serve, image):
    allocated, fresh = 8 * MiB, 40 * MiB  # one block written before, one never written
    with hosted(serve, image) as server:
        with connected(server) as c:
            assert c.write(allocated, b"\x11" * MiB).error == 0
            assert c.command(p.CMD_FLUSH).error == 0
        for where in (allocated, fresh):
            for sent in (0, 1, MiB // 2, MiB - 1):  # of the write's MiB
                with connected(server) as h:
                    h.send(request_header(p.CMD_WRITE, where, MiB, cookie=7) + b"\xee" * sent)
                    h.sock.shutdown(socket.SHUT_WR)
                    assert_disconnected(h)  # the server has seen the end of the connection
        with connected(server, meta_context=True) as c:
            assert c.read(allocated, MiB).data == b"\x11" * MiB
            assert c.read(fresh, MiB).data == bytes(MiB)
            assert c.command(p.CMD_BLOCK_STATUS, fresh, MiB).extents[0] == (MiB, p.STATE_HOLE | p.STATE_ZERO)
    with Disk.open(image, read_only=True) as disk:  # stopped and checked clean by now: what the file holds
        assert disk.read(allocated, MiB) == b"\x11" * MiB
        assert disk.read(fresh, MiB) == bytes(MiB)


def _in_flight(c: RawClient, rnd: random.Random, requests: list[tuple]) -> dict[int, tuple]:
    """Send every request before reading any reply, each with a random cookie; the replies by cookie."""
    by_cookie: dict[int, tuple] = {}
    for request in requests:
        cookie = rnd.getrandbits(64)
        by_cookie[cookie] = request
        kind, offset, length, data = request
        c.request(kind, offset, length, data, cookie=cookie)
    order = []
    replies = {}
    for _ in requests:
        reply = c.reply()
        assert reply.cookie in by_cookie and reply.cookie not in replies, reply.cookie
        replies[reply.cookie] = reply
        order.append(reply.cookie)
    return {cookie: (by_cookie[cookie], replies[cookie]) for cookie in order}


def test_many_requests_in_flight_matched_by_cookie(server):
    for structured in (False, True):
        rnd = random.Random(structured)
        stride, n = 256 * KiB, 120
        contents = {i * stride: rnd.randbytes(rnd.choice([512, 4096, 65536, 100000])) for i in range(n)}
        with connected(server, meta_context=structured) as c:
            writes = [(p.CMD_WRITE, off, len(data), data) for off, data in contents.items()]
            writes += [(p.CMD_WRITE_ZEROES, n * stride + i * 8192, 4096, b"") for i in range(20)]
            writes += [(p.CMD_FLUSH, 0, 0, b"")]
            rnd.shuffle(writes)
            for (kind, *_), reply in _in_flight(c, rnd, writes).values():
                assert reply.error == 0, (kind, reply)
            reads = [(p.CMD_READ, off, len(data), b"") for off, data in contents.items()]
            reads += [(p.CMD_CACHE, 0, MiB, b""), (p.CMD_READ, n * stride, 8192, b"")]
            if structured:
                reads += [(p.CMD_BLOCK_STATUS, 0, 16 * MiB, b"")] * 5
            rnd.shuffle(reads)
            for (kind, offset, length, _), reply in _in_flight(c, rnd, reads).values():
                assert reply.error == 0, (kind, reply)
                if kind == p.CMD_READ:
                    assert reply.data == contents.get(offset, bytes(length)), offset
                elif kind == p.CMD_BLOCK_STATUS:
                    assert sum(n for n, _ in reply.extents) == 16 * MiB
            # NBD_CMD_DISC behind requests in flight: they are answered, then the server closes.
            cookies = [c.request(p.CMD_READ, off, len(data)) for off, data in list(contents.items())[:20]]
            c.disconnect()
            assert sorted(c.reply().cookie for _ in cookies) == sorted(cookies)
            assert_disconnected(c)


# -- memory ---------------------------------------------------------------------------------------------
def daemon_pid(server) -> int:
    config = ServeConfig(images=[], socket=str(server.socket))
    pid = read_record(state_file(config), address_key(config))
    assert pid is not None, "no pid record for the server"
    return pid


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith("Vm"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def flood(sock: socket.socket, messages: Iterable[bytes | memoryview], seconds: float) -> int:
    """Send ``messages`` without ever reading, giving up once ``seconds`` have passed (the server stops
    reading when its budget is spent, so the sends block: that is expected); how many went whole."""
    sock.setblocking(False)
    deadline = time.monotonic() + seconds
    sent = 0
    for message in messages:
        view = memoryview(message)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                return sent
            try:
                view = view[sock.send(view):]
            except BlockingIOError:
                select.select([], [sock], [], min(left, 0.1))
            except (BrokenPipeError, ConnectionResetError):
                return sent
        sent += 1
    return sent


def watch_memory(pid: int, seconds: float) -> int:
    """The daemon's peak RSS over ``seconds``."""
    deadline = time.monotonic() + seconds
    peak = 0
    while time.monotonic() < deadline:
        peak = max(peak, *memory(pid).values())
        time.sleep(0.1)
    return peak


def test_memory_bounded_with_1000_large_reads_never_read(server):
    pid = daemon_pid(server)
    with connected(server) as c:  # data in both halves, so reads come from the file (and its page cache)
        assert c.write(0, b"\x44" * MAX_PAYLOAD).error == 0
        assert c.write(MAX_PAYLOAD, b"\x55" * MAX_PAYLOAD).error == 0
    with connected(server) as c:
        headers = (request_header(p.CMD_READ, (i % 2) * MAX_PAYLOAD, MAX_PAYLOAD, cookie=i) for i in range(1000))
        sent = flood(c.sock, headers, 1)
        peak = watch_memory(pid, 1.5)
    print(f"\n1000 reads of 32 MiB: {sent} sent, daemon peak RSS {peak / MiB:.0f} MiB")
    assert peak < RSS_LIMIT, f"daemon RSS {peak / MiB:.0f} MiB"
    with connected(server) as c:
        assert c.read(MAX_PAYLOAD, 4096).data == b"\x55" * 4096


def test_memory_bounded_with_1000_large_writes(server):
    pid = daemon_pid(server)
    payload = random.Random(1).randbytes(MAX_PAYLOAD)

    def writes():
        for i in range(1000):
            yield request_header(p.CMD_WRITE, (i % 2) * MAX_PAYLOAD, MAX_PAYLOAD, cookie=i)
            yield payload

    with connected(server) as c:
        sent = flood(c.sock, writes(), 2.5) // 2
        peak = watch_memory(pid, 1)
    print(f"\n1000 writes of 32 MiB: {sent} sent, daemon peak RSS {peak / MiB:.0f} MiB")
    assert peak < RSS_LIMIT, f"daemon RSS {peak / MiB:.0f} MiB"
    assert sent >= 2
    with connected(server) as c:
        assert c.read(0, 4096).data == payload[:4096]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_client_gone_costs_nothing_more(server):
    """Once a client has left, the requests it had sent (and the server had not yet read) must not be
    served: reading 32 MiB for each of hundreds of READs nobody will receive is seconds of a CPU, taken
    from the clients still there."""
    pid = daemon_pid(server)
    with connected(server) as c:
        assert c.write(0, b"\x44" * MAX_PAYLOAD).error == 0
    with connected(server) as c:
        flood(c.sock, (request_header(p.CMD_READ, 0, MAX_PAYLOAD, cookie=i) for i in range(1000)), 1)
    time.sleep(0.5)
    before = cpu_seconds(pid)
    time.sleep(1)
    busy = cpu_seconds(pid) - before
    assert busy < 0.2, f"the server used {busy:.2f} s of CPU in the second after its client left"


def test_memory_bounded_with_several_connections_flooding(server):
    """One client may open several connections: their budgets together must keep the daemon bounded too."""
    pid = daemon_pid(server)
    with connected(server) as c:
        assert c.write(0, b"\x44" * MAX_PAYLOAD).error == 0
        assert c.write(MAX_PAYLOAD, b"\x55" * MAX_PAYLOAD).error == 0
    clients = [connected(server) for _ in range(6)]
    try:
        for c in clients:  # a few bytes each: enough to spend each connection's budget
            flood(c.sock, (request_header(p.CMD_READ, (i % 2) * MAX_PAYLOAD, MAX_PAYLOAD, cookie=i)
                           for i in range(20)), 0.2)
        peak = watch_memory(pid, 1.5)
    finally:
        for c in clients:
            c.close()
    print(f"\n6 connections x 20 reads of 32 MiB: daemon peak RSS {peak / MiB:.0f} MiB")
    assert peak < RSS_LIMIT, f"daemon RSS {peak / MiB:.0f} MiB"


def test_a_client_that_never_reads_its_replies_cannot_hold_up_a_stop(serve, image):
    """`vhdxfs stop` finishes the requests in flight; the replies to a client that stopped reading can never
    all be sent, and that must not keep the images open (and the stop waiting) for as long as it likes."""
    with serve(image) as server:
        with connected(server) as c:
            flood(c.sock, (request_header(p.CMD_READ, 0, MAX_PAYLOAD, cookie=i) for i in range(100)), 1)
            stop = subprocess.Popen([sys.executable, "-m", "vhdxfs.cli", "stop", server.address],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                stopped_in_time = stop.wait(timeout=4) == 0
            except subprocess.TimeoutExpired:
                stopped_in_time = False
        out = stop.communicate(timeout=20)[0]  # the client is gone now: the stop completes either way
    assert stopped_in_time, f"the stop waited for a client that does not read: {out}"
    check_clean(image)
