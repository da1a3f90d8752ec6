"""One client's connection: exact-length reads over a trio stream, and whole messages out.

Replies of requests served concurrently must not interleave inside a message. During the handshake a
message is sent at once (``send``); in transmission, replies are queued (``queue``) and one sender task
writes everything queued so far with a single sendmsg (gathered, like writev), so a burst of replies at
queue depth 16 costs one system call and one wake-up of the client, not two per reply. Reads are
buffered: a request header is 28 bytes, and one receive usually brings several.

Replies of the requests the reader serves itself (``queue(..., later=True)``) wait in a batch until the
reader has nothing left in its buffer: then they go out together, in one writev, before it waits for the
client again (``flush``; every receive does it first). At queue depth 16 a burst of requests costs one
receive and one send, not a send per request.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from socket import SO_SNDBUF, SOL_SOCKET

import trio

RECEIVE_SIZE = 256 << 10
# The socket's send buffer: room for a whole 1 MiB read reply, so it goes out in one writev instead of five
# partial sends, each a wait for the socket to drain (the default is 208 KiB; Linux caps the value at
# net.core.wmem_max and doubles it for its own bookkeeping).
SEND_BUFFER = 2 << 20
Chunk = bytes | bytearray | memoryview
Parts = tuple[Chunk, ...]  # one message, as the pieces it is sent from


class Closed(Exception):
    """The peer closed the connection (or it broke) where the protocol expected more bytes."""


class Wire:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._send_lock = trio.Lock()
        self._out: list[Chunk] = []
        self._sent_callbacks: list[Callable[[], None]] = []
        self._wake_sender = trio.Event()
        self._closing = False
        self.broken = trio.Event()  # a send found the peer gone: stop reading its requests
        self._sending = False  # the sender task is writing: nothing may go to the socket beside it
        self._batch: list[Chunk] = []  # replies the reader queued later=True, sent by ``flush``
        self._batch_callbacks: list[Callable[[], None]] = []
        socket = getattr(stream, "socket", None)  # a plain socket can be written to directly; TLS cannot
        self._fd = socket.fileno() if socket is not None else -1
        if socket is not None:
            with contextlib.suppress(OSError):
                socket.setsockopt(SOL_SOCKET, SO_SNDBUF, SEND_BUFFER)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet read (STARTTLS needs none to be pending)."""
        return len(self._buffer)

    def take(self, n: int) -> bytes | None:
        """The next ``n`` bytes if the buffer holds them (no wait, no trip through the scheduler), else None."""
        buf = self._buffer
        if len(buf) < n:
            return None
        out = bytes(buf[:n])
        del buf[:n]
        return out

    async def exactly(self, n: int) -> bytes:
        """The next ``n`` bytes; Closed when the stream ends first."""
        buf = self._buffer
        while len(buf) < n:
            if self._batch:
                self.flush()
            try:
                data = await self.stream.receive_some(max(RECEIVE_SIZE, n - len(buf)))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise Closed(str(exc)) from None
            if not data:
                raise Closed("the client closed the connection")
            buf += data
        out = bytes(buf[:n])
        del buf[:n]
        return out

    async def payload(self, n: int) -> bytes:
        """A write's ``n`` bytes of data (up to 32 MiB) as one ``bytes``: joined once from what arrives, so the
        engine's write-back queue can keep it without copying it again."""
        first = bytes(self._buffer[:n])
        del self._buffer[:n]
        rest: list[bytes | bytearray] = []
        have = len(first)
        while have < n:
            if self._batch:
                self.flush()
            try:
                data = await self.stream.receive_some(n - have)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise Closed(str(exc)) from None
            if not data:
                raise Closed("the client closed the connection in the middle of a write's data")
            rest.append(data)
            have += len(data)
        return b"".join([first, *rest]) if rest else first

    async def send(self, *parts: Chunk) -> None:
        """Send one message made of ``parts``, never interleaved with another; Closed if the peer is gone."""
        async with self._send_lock:
            try:
                for part in parts:
                    if part:
                        await self.stream.send_all(part)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise Closed(str(exc)) from None

    def queue(self, parts: Parts, on_sent: Callable[[], None] | None = None, *, later: bool = False) -> None:
        """Send one message: at once when nothing waits before it and the socket takes it all, else through
        the sender task; with ``later`` (the reader's own replies) at its next ``flush``. ``on_sent`` runs
        once it is written (or the peer is gone)."""
        if later:
            self._batch.extend(parts)
            if on_sent is not None:
                self._batch_callbacks.append(on_sent)
            return
        if not self._out and not self._sending and self._fd >= 0:
            parts = _write_now(self._fd, parts)
            if not parts:
                if on_sent is not None:
                    on_sent()
                return
        self._out.extend(parts)
        if on_sent is not None:
            self._sent_callbacks.append(on_sent)
        self._wake_sender.set()

    def flush(self) -> None:
        """Send the replies queued ``later`` so far, together."""
        parts, self._batch = self._batch, []
        callbacks, self._batch_callbacks = self._batch_callbacks, []
        if not self._out and not self._sending and self._fd >= 0:
            left = _write_now(self._fd, tuple(parts))
            if not left:
                for callback in callbacks:
                    callback()
                return
            parts = list(left)
        self._out.extend(parts)
        self._sent_callbacks.extend(callbacks)
        self._wake_sender.set()

    async def sender(self) -> None:
        """Write queued messages until ``finish_sending``, gathering all that wait into one system call."""
        sock: trio.socket.SocketType | None = getattr(self.stream, "socket", None)  # plain: gathers; TLS cannot
        broken = False
        while True:
            await self._wake_sender.wait()
            self._wake_sender = trio.Event()
            parts, self._out = self._out, []
            callbacks, self._sent_callbacks = self._sent_callbacks, []
            if parts and not broken:
                self._sending = True
                try:
                    if sock is not None:
                        await _send_gathered(sock, parts)
                    else:
                        await self.stream.send_all(b"".join(parts))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    broken = True
                    self.broken.set()  # the client is gone: replies are dropped, their budget still released
                finally:
                    self._sending = False
            for callback in callbacks:
                callback()
            if self._closing and not self._out:
                return

    def finish_sending(self) -> None:
        """The sender ends once everything queued so far is written."""
        if self._batch:
            self.flush()
        self._closing = True
        self._wake_sender.set()

    def upgrade(self, stream: trio.abc.Stream) -> None:
        """Go on over ``stream`` (TLS wrapped around the old one)."""
        self.stream = stream
        self._fd = -1

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


async def cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` once ``event`` is set (the server is stopping): run it beside the work it ends."""
    await event.wait()
    scope.cancel()


async def _send_gathered(sock: trio.socket.SocketType, parts: list[Chunk]) -> None:
    """sendmsg all of ``parts``, resuming after partial sends."""
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    while views:
        sent = await sock.sendmsg(views[:1024])  # IOV_MAX
        while sent and views:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def _write_now(fd: int, parts: Parts) -> Parts:
    """writev as much of ``parts`` as the socket takes without blocking; what is left (empty when all went)."""
    try:
        sent = os.writev(fd, [part for part in parts if len(part)][:1024])
    except (BlockingIOError, InterruptedError):
        return parts
    except OSError:
        return parts  # broken: the sender task meets the error again and drops the replies
    out: list[Chunk] = []
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
        else:
            out.append(memoryview(part)[sent:])
            sent = 0
    return tuple(out)
