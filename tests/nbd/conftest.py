"""Fixtures for the NBD server tests: a real `vhdxfs serve` daemon, started as a user would and stopped
with `vhdxfs stop` (which waits until every image is closed cleanly)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import need_tools, vhdxfs


@dataclass
class Server:
    address: str  # the unix socket path or HOST:PORT given to `vhdxfs stop`
    socket: Path | None
    port: int | None

    def uri(self, export: str = "", scheme: str = "nbd") -> str:
        """The NBD URI of ``export`` (the default export when empty), as qemu-img, nbdinfo and nbdcopy take it."""
        if self.socket is not None:
            return f"{scheme}+unix:///{export}?socket={self.socket}"
        return f"{scheme}://127.0.0.1:{self.port}/{export}"

    def stop(self) -> None:
        result = vhdxfs("stop", self.address)
        assert result.returncode == 0, result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(*args: str | os.PathLike, socket_path: Path | None = None, tcp: bool = False) -> Iterator[Server]:
    """Run `vhdxfs serve ARGS` (daemon) on ``socket_path`` or a free loopback TCP port until the block ends."""
    if tcp:
        port = free_port()
        server = Server(f"127.0.0.1:{port}", None, port)
        where = ["--listen", server.address]
    else:
        server = Server(str(socket_path), socket_path, None)
        where = ["--socket", str(socket_path)]
    result = vhdxfs("serve", *map(str, args), *where)
    assert result.returncode == 0, result.stderr
    try:
        yield server
    finally:
        if vhdxfs("stop", server.address).returncode != 0:
            subprocess.run(["pkill", "-f", f"vhdxfs.*serve.*{server.address}"], check=False)


@pytest.fixture
def nbd_tools():
    need_tools("qemu-img", "qemu-io", "nbdinfo", "nbdcopy")


@pytest.fixture
def serve(tmp_path, nbd_tools):
    """serve(*args, tcp=False) -> context manager yielding a Server on a socket in tmp_path (or TCP)."""
    counter = iter(range(1000))

    def start(*args, tcp: bool = False):
        return serving(*args, socket_path=tmp_path / f"nbd{next(counter)}.sock", tcp=tcp)

    return start
