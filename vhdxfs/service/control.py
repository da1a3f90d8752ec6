"""The control channel of a running daemon: a unix socket beside its pid record, speaking the JSON lines of
control_protocol.py, through which `vhdxfs status`, `checkpoint`, `merge` and `resize` reach a running disk.

It lives on the daemon's stack (service/lifecycle.py): bound once the front end serves, closed first.
Mode 0600, so only the daemon's user (and root) may connect. What a client may not do to the daemon:

- kill it or wedge it: every failure of a connection (garbage, a line over MAX_LINE, a client that
  vanishes, a bug) ends that connection only; at most MAX_CLIENTS connections at a time, a client that
  does not take its replies within SEND_TIMEOUT is dropped;
- leave a change half done: a command runs in the daemon's nursery, not the connection's, so a client
  that goes away mid-merge leaves a merge that finishes (or, when the daemon stops, undoes itself: the
  channel's close cancels what runs and waits for it, before the images close).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..errors import Reason, VhdxError
from . import control_protocol as cp

log = logging.getLogger("vhdxfs.control")

MAX_CLIENTS = 32  # connections at a time; more are told so and closed
BACKLOG = 128  # connections waiting to be accepted (a unix socket refuses more with EAGAIN)
SEND_TIMEOUT = 30.0  # seconds a client may leave a reply untaken before it is dropped
RECEIVE = 16 << 10
EVENTS_KEPT = 16  # progress events waiting for a slow client; later ones are dropped (the next says it all)

Emit = Callable[[str, dict[str, Any]], None]  # (event name, data): never waits; dropped for a slow client


@dataclass(frozen=True)
class Command:
    """A command of the channel: its arguments, what runs it, whether it changes what the daemon holds
    (then the pid record is written again after it, whatever its outcome)."""

    params: Mapping[str, cp.Param]
    run: Callable[[dict[str, Any], Emit], Awaitable[Any]]
    help: str = ""
    changes: bool = False


@dataclass(eq=False)
class Job:
    """One command running in the daemon's nursery; its connection (if still there) reads its events."""

    command: Command
    arguments: dict[str, Any]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    outcome: tuple[str, Any] = ("error", None)  # ("return", value) or ("error", error object)

    def __post_init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[tuple[str, dict[str, Any]]](EVENTS_KEPT)

    def emit(self, name: str, data: dict[str, Any]) -> None:
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self.send.send_nowait((name, data))

    async def run(self, changed: Callable[[], None]) -> None:
        try:
            with self.scope:
                try:
                    self.outcome = ("return", await self.command.run(self.arguments, self.emit))
                except Exception as exc:  # noqa: BLE001 - the client is told; a bug costs one request
                    cause = _leaf(exc)
                    if not isinstance(cause, VhdxError):
                        log.exception("control command failed")
                    self.outcome = ("error", cp.error_of(cause))
            if self.scope.cancelled_caught:
                self.outcome = ("error", cp.error_of(VhdxError("the daemon is stopping; the command was undone "
                                                               "or finished", reason=Reason.INTERRUPTED)))
        finally:
            if self.command.changes:
                with contextlib.suppress(Exception):
                    changed()
            self.done.set()
            self.send.close()


def _leaf(exc: BaseException) -> BaseException:
    """The one error a nursery wrapped in groups (a command's own nursery: a merge and its progress)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Channel:
    """The listener's side: connections, and the jobs they started."""

    def __init__(self, nursery: trio.Nursery, stopping: trio.Event, hello: Callable[[], dict[str, Any]],
                 commands: Mapping[str, Command], changed: Callable[[], None]) -> None:
        self.nursery = nursery  # the daemon's: jobs run there
        self.stopping = stopping
        self.hello = hello
        self.commands = commands
        self.changed = changed
        self.jobs: set[Job] = set()
        self.clients = 0

    async def serve(self, listener: trio.SocketListener,
                    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as connections:
                task_status.started(scope)
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:  # EMFILE and friends: wait a little rather than spin
                        log.warning("control channel: accept: %s", exc)
                        await trio.sleep(0.1)
                        continue
                    connections.start_soon(self._client, stream)

    async def stop(self) -> None:
        """Cancel what runs (each command finishes or undoes itself) and wait for it (call shielded)."""
        for job in list(self.jobs):
            job.scope.cancel()
        for job in list(self.jobs):
            await job.done.wait()

    async def _client(self, stream: trio.SocketStream) -> None:
        self.clients += 1
        try:
            async with stream:
                if self.clients > MAX_CLIENTS:
                    error = cp.error_of(VhdxError(f"too many clients (at most {MAX_CLIENTS}); try again",
                                                  reason=Reason.LOCKED))
                    await self._send(stream, cp.error_reply(error))
                    return
                await self._send(stream, cp.greeting(self.hello()))
                await self._session(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as exc:
            log.debug("control client gone: %s", exc)
        except Exception:  # a bug costs this connection, never the daemon
            log.exception("control connection failed")
        finally:
            self.clients -= 1

    async def _session(self, stream: trio.SocketStream) -> None:
        reader = cp.LineReader()
        while True:
            data = await stream.receive_some(RECEIVE)
            if not data:
                return
            try:
                lines = reader.feed(data)
            except cp.BadMessage as exc:
                await self._send(stream, cp.error_reply(cp.error_of(exc)))
                return  # the rest of the stream cannot be read as lines
            for line in lines:
                if line.strip():
                    await self._request(stream, line)

    async def _request(self, stream: trio.SocketStream, line: bytes) -> None:
        rid: cp.RequestId = None
        try:
            request = cp.parse_request(line)
            rid = request.id
            command = self.commands.get(request.command)
            if command is None:
                names = ", ".join(sorted(self.commands))
                raise cp.BadMessage(f"no command {request.command[:64]!r} (there are: {names})", cp.NOT_FOUND, rid)
            arguments = cp.check_arguments(request, command.params)
            if self.stopping.is_set():
                raise VhdxError("the daemon is stopping", reason=Reason.INTERRUPTED)
        except VhdxError as exc:
            await self._send(stream, cp.error_reply(cp.error_of(exc), getattr(exc, "request_id", rid)))
            return
        job = Job(command, arguments)
        self.jobs.add(job)
        self.nursery.start_soon(self._run, job)
        try:
            async with job.receive:
                async for name, data in job.receive:
                    await self._send(stream, cp.event(name, data, rid))
            await job.done.wait()
        finally:
            job.receive.close()
        kind, value = job.outcome
        await self._send(stream, cp.reply(value, rid) if kind == "return" else cp.error_reply(value, rid))

    async def _run(self, job: Job) -> None:
        try:
            await job.run(self.changed)
        finally:
            self.jobs.discard(job)

    @staticmethod
    async def _send(stream: trio.SocketStream, line: bytes) -> None:
        with trio.fail_after(SEND_TIMEOUT):
            await stream.send_all(line)


def bind_unix(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600 from the start (a stale one from a daemon that died
    is replaced); a path too long for sun_path is bound through its directory's descriptor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    folder = -1
    old = os.umask(0o177)
    try:
        address = str(path)
        if len(os.fsencode(address)) > cp.SUN_PATH_MAX:
            folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            address = f"/proc/self/fd/{folder}/{path.name}"
        sock.bind(address)
        os.chmod(path, 0o600)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
        if folder >= 0:
            os.close(folder)
    return sock


def control_path(record: Path, key: str) -> Path:
    """Beside the pid record: record_path(key, ".ctl") in the same directory."""
    from .records import record_path

    return record.parent / record_path(key, ".ctl").name


@contextlib.asynccontextmanager
async def control_channel(nursery: trio.Nursery, stopping: trio.Event, path: Path,
                          hello: Callable[[], dict[str, Any]], commands: Mapping[str, Command],
                          changed: Callable[[], None]) -> AsyncIterator[Path]:
    """The channel at ``path`` while the block runs: ``hello()`` is each greeting, ``changed()`` is called
    after each command that changes what the daemon holds. At the exit, in order: no more connections or
    requests, what runs is cancelled and waited for (shielded), the socket file goes."""
    try:
        sock = bind_unix(path)
    except OSError as exc:
        raise VhdxError(f"cannot make the control socket: {exc.strerror or exc}", path=path, errno=exc.errno,
                        reason=Reason.HOST_IO) from None
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    channel = Channel(nursery, stopping, hello, commands, changed)
    scope = await nursery.start(channel.serve, listener)
    try:
        yield path
    finally:
        scope.cancel()
        with trio.CancelScope(shield=True):
            await channel.stop()
            await listener.aclose()
        with contextlib.suppress(OSError):
            path.unlink()
