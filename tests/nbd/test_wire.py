"""A 1 MiB read reply leaves in one write, not through the sender task.

With the socket's default send buffer (208 KiB) a 1 MiB reply went out in about five partial sends, each a
wait for the client to drain the socket; the wire asks for a buffer that holds a whole reply (SEND_BUFFER in
vhdxfs/nbd/wire.py). In process, over a socket pair whose other end reads nothing: the reply must be
written the moment it is queued.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from vhdxfs.nbd.wire import SEND_BUFFER, Wire

MiB = 1 << 20
WMEM_MAX = Path("/proc/sys/net/core/wmem_max")


async def test_a_1_mib_reply_is_written_at_once_while_the_client_reads_nothing():
    if int(WMEM_MAX.read_text()) < SEND_BUFFER:
        pytest.skip(f"net.core.wmem_max is {WMEM_MAX.read_text().strip()}, below the {SEND_BUFFER} the wire asks")
    client, server = socket.socketpair()
    try:
        wire = Wire(trio.SocketStream(trio.socket.from_stdlib_socket(server)))
        sent: list[bool] = []
        wire.queue((b"h" * 16, bytes(MiB)), lambda: sent.append(True))
        assert sent == [True], "the reply waits for the sender task: the send buffer does not hold it"
        client.setblocking(False)
        got = bytearray()
        while len(got) < 16 + MiB:
            got += client.recv(16 + MiB - len(got))
        assert got[:16] == b"h" * 16 and not any(got[16:])
    finally:
        client.close()
        server.close()
