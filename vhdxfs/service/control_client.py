"""The client's side of a daemon's control channel (control.py), blocking: what the CLI commands use.

    with ControlClient(holder.control) as client:
        client.greeting["pid"]
        client.call("merge", {"layer": "disk_1.avhdx"}, on_event=show)   # the return value, or VhdxError
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import Reason, VhdxError
from . import control_protocol as cp

MAX_REPLY = 64 << 20  # bytes of one line from the daemon (a status of many images)
CONNECT_TIMEOUT = 30.0

OnEvent = Callable[[str, dict[str, Any]], None]


class ControlClient:
    """One connection to a daemon's control socket; ``greeting`` is what the daemon said first."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = CONNECT_TIMEOUT) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._reader = cp.LineReader(MAX_REPLY)
        self._lines: list[bytes] = []
        self._next_id = 1
        try:
            _connect(self.sock, self.path)  # blocking: a unix socket's connect waits for room in the backlog
            self.sock.settimeout(timeout)
            first = self._message()
        except BaseException:
            self.sock.close()
            raise
        if first.kind == "error":
            self.sock.close()
            raise cp.exception_of(first.value).with_path(self.path)
        if first.kind != "greeting":
            self.sock.close()
            raise VhdxError("the daemon did not greet (not a vhdxfs control socket?)", path=self.path,
                            errno=errno.EPROTO, reason=Reason.HOST_IO)
        self.greeting: dict[str, Any] = first.value

    def call(self, command: str, arguments: Mapping[str, Any] | None = None, *, on_event: OnEvent | None = None,
             timeout: float | None = None) -> Any:
        """Run ``command``; its return value, or the VhdxError it failed with (errno, reason, file as the
        daemon said). ``on_event`` sees its events (a merge's progress). ``timeout``: seconds without a
        word from the daemon (None: wait as long as it takes)."""
        rid = self._next_id
        self._next_id += 1
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(cp.request(command, arguments, rid))
        except OSError as exc:
            raise self._lost(exc) from None
        while True:
            message = self._message()
            if message.kind == "event" and on_event is not None:
                on_event(message.event, message.value)
            elif message.kind == "return":
                return message.value
            elif message.kind == "error":
                raise cp.exception_of(message.value)

    def _message(self) -> cp.Message:
        while not self._lines:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise VhdxError("the daemon does not answer on its control socket", path=self.path,
                                errno=errno.ETIMEDOUT, reason=Reason.TIMED_OUT) from None
            except OSError as exc:
                raise self._lost(exc) from None
            if not data:
                raise VhdxError("the daemon closed its control connection (did it stop?)", path=self.path,
                                errno=errno.ECONNRESET, reason=Reason.HOST_IO)
            self._lines = [line for line in self._reader.feed(data) if line.strip()]
        try:
            return cp.parse_message(self._lines.pop(0))
        except cp.BadMessage as exc:
            raise VhdxError(f"the daemon said something that is not the control protocol: {exc}", path=self.path,
                            errno=errno.EPROTO, reason=Reason.HOST_IO) from None

    def _lost(self, exc: OSError) -> VhdxError:
        return VhdxError(f"cannot talk to the daemon: {exc.strerror or exc}", path=self.path,
                         errno=exc.errno or errno.EIO, reason=Reason.HOST_IO)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _connect(sock: socket.socket, path: Path) -> None:
    address = str(path)
    folder = -1
    try:
        if len(os.fsencode(address)) > cp.SUN_PATH_MAX:
            folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            address = f"/proc/self/fd/{folder}/{path.name}"
        sock.connect(address)
    except OSError as exc:
        why = "the daemon is gone (a stale socket)" if exc.errno == errno.ECONNREFUSED else exc.strerror or str(exc)
        raise VhdxError(f"cannot reach the daemon's control socket: {why}", path=path, errno=exc.errno or errno.EIO,
                        reason=Reason.DENIED if exc.errno in (errno.EACCES, errno.EPERM) else Reason.HOST_IO) from None
    finally:
        if folder >= 0:
            os.close(folder)
