"""A client that keeps the reader's buffer full does not hold the trio loop from everyone else.

The reader serves buffered requests that need no wait without passing through trio's scheduler (the
point of vhdxfs/nbd/transmission.py's fast path), so without a bound one receive of 256 KiB of 1-byte
READs (about 9,000 requests) would run end to end while every other connection of the daemon waits. The
reader lets the others run once every FAIR_SHARE requests; here a task beside it must get turns in the
middle of such a burst. In process, over a socket pair: the burst is in the socket before the reader
starts, and the replies fit in the other end's buffer.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios

import trio

from tests.helpers import make_image
from tests.nbd.rawclient import request_header
from vhdxfs.engine.aio import AsyncDisk
from vhdxfs.nbd import protocol as p
from vhdxfs.nbd.exports import Export
from vhdxfs.nbd.handshake import Session
from vhdxfs.nbd.transmission import Transmission
from vhdxfs.nbd.wire import Wire

MiB = 1 << 20
BURST = 4000
REPLY = 16 + 1  # a simple reply (magic, error, cookie) and the byte read


def waiting(sock: socket.socket) -> int:
    """Bytes received on ``sock`` and not yet read."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


async def test_a_full_buffer_of_requests_lets_other_tasks_run(tmp_path):
    image = make_image(tmp_path / "disk.vhdx", 8 * MiB)
    client, server = socket.socketpair()
    for end in (client, server):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    client.sendall(b"".join(request_header(p.CMD_READ, i % 8 * MiB, 1, cookie=i) for i in range(BURST))
                   + request_header(p.CMD_DISC))
    seen: list[int] = []  # the reply bytes arrived, each time a task beside the reader ran
    done = trio.Event()

    async def beside() -> None:
        while not done.is_set():
            seen.append(waiting(client))
            await trio.sleep(0)

    try:
        async with await AsyncDisk.open(image, read_only=True) as disk:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(server))
            transmission = Transmission(Wire(stream), Session(export=Export("", disk)))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(beside)
                await trio.sleep(0)
                await transmission.run(trio.Event())
                done.set()
        assert waiting(client) == BURST * REPLY
    finally:
        client.close()
        server.close()
    middle = {n for n in seen if 0 < n < BURST * REPLY}
    # FAIR_SHARE (64) gives about 60 turns in the middle; serving the burst end to end gives one or two.
    assert len(middle) >= 20, sorted(middle)
