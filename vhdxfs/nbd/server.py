"""The NBD server daemon: listen, open the images, serve clients, and on SIGTERM close everything cleanly.

Every image is opened once, as an AsyncDisk, and shared by all connections (which is what lets the
exports advertise CAN_MULTI_CONN). A writable image is locked exactly as a mounted one, so a second
writer, mount or server, is refused. Stopping (SIGTERM/SIGINT/SIGHUP, or ``vhdxfs stop``): the listeners
close, each connection stops reading requests and finishes those in flight, then every image is flushed
and closed (log applied, LogGuid cleared) and the pid record removed. The sequence is the one every daemon
lives (service/lifecycle.py); this module gives it what the server opens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..engine import parse_location
from ..engine.aio import close_disks, open_disks
from ..engine.live import Served, command_table, held, opened_paths
from ..errors import UsageError
from ..service.control import Command, Emit
from ..service.daemon import Ready
from ..service.lifecycle import Life, Serving, run_daemon
from ..service.records import record_path
from . import listeners as lsn
from .budget import SERVER_BUDGET, ByteBudget
from .connection import handle_client
from .exports import Export, Exports, export_name

log = logging.getLogger("vhdxfs.nbd")


@dataclass
class ServeConfig:
    images: list[str]
    read_only: bool = False
    parent: str | None = None
    socket: str | None = None
    listen: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    insecure_no_tls: bool = False
    handshake_timeout: float = 30.0
    debug: bool = False
    exports: list[str] = field(default_factory=list)  # filled by check_config: one name per image


def address_key(config: ServeConfig) -> str:
    """What the pid record and ``vhdxfs stop`` call this server: its socket, or its TCP address."""
    if config.listen:
        host, port = lsn.parse_address(config.listen)
        return f"tcp:{host}:{port}"
    return f"unix:{os.path.realpath(_socket_path(config))}"


def _socket_path(config: ServeConfig) -> str:
    if not config.socket:
        raise UsageError("give --socket or --listen", field="--socket")
    return config.socket


def state_file(config: ServeConfig) -> Path:
    return record_path(address_key(config), ".nbd.pid")


def _listening_sockets(config: ServeConfig) -> tuple[list[socket.socket], str | None]:
    """The sockets to serve on, and the unix socket path this server made (to remove when it stops)."""
    socks = lsn.inherited_sockets()
    if socks:  # socket activation: the server is known by the socket systemd gave it (records, vhdxfs stop)
        name = socks[0].getsockname()
        if isinstance(name, str):
            config.socket, config.listen = name, None
        else:
            host = name[0]
            config.listen = f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"
        return socks, None
    if config.listen:
        return lsn.tcp_sockets(*lsn.parse_address(config.listen)), None
    path = _socket_path(config)
    return [lsn.unix_socket(path)], path


def _close_sockets(socks: list[socket.socket], made: str | None) -> None:
    """The listening sockets, and the unix socket this server made (an inherited one stays: systemd's)."""
    lsn.close_all(socks)
    if made:
        with contextlib.suppress(OSError):
            os.unlink(made)


async def _close_listeners(listeners: list[trio.SocketListener]) -> None:
    for listener in listeners:
        await listener.aclose()


async def serve(config: ServeConfig, ready: Ready) -> None:
    """Open, listen, call ``ready(None)`` (or ``ready(error)`` on failure), serve until told to stop."""
    await run_daemon(ready, functools.partial(_start, config),
                     stop_message="finishing the requests in flight, then closing the images")


async def _start(config: ServeConfig, life: Life) -> Serving:
    """Enter the listening sockets, the disks, the connections' nursery and the accept loops on the
    daemon's stack (service/lifecycle.py). At the close, in reverse: the listeners stop accepting, each
    connection sees ``life.stopping``, finishes its requests and ends (the nursery waits for them), the
    images close, the socket file goes."""
    tls = lsn.tls_context(config.tls_cert, config.tls_key, config.tls_ca)
    socks, made = _listening_sockets(config)
    life.callback(_close_sockets, socks, made)
    for sock in socks:
        lsn.check_plaintext(sock, tls is not None, config.insecure_no_tls)
    paths = await opened_paths(config.images, config.read_only)  # the top of a checkpointed chain
    disks = await open_disks(paths, read_only=config.read_only, parent=config.parent)
    life.on_close(close_disks, disks)
    # Names fixed now, from the images as given: a disk's path moves on with checkpoints and merges.
    served = [Served(export_name(image), parse_location(image), disk)
              for image, disk in zip(config.images, disks, strict=True)]
    exports = Exports({s.name: Export(s.name, s.disk, str(s.image)) for s in served}, tls, config.handshake_timeout)
    exports.budget = ByteBudget(SERVER_BUDGET)  # the data in flight of all connections: bounded with many
    connections = await life.enter(trio.open_nursery())
    listeners = lsn.trio_listeners(socks)
    for listener in listeners:
        connections.start_soon(_accept, listener, exports, life.stopping, connections)
    life.on_close(_close_listeners, listeners)
    names = ", ".join(exports.by_name)
    key = address_key(config)
    return Serving(record=state_file(config), key=key, status=f"serving {names}", announce=f"serving {names} on {key}",
                   serve=life.stopping.wait, kind="nbd", commands=_commands(served, exports, life), held=held(served))


def _commands(served: list[Served], exports: Exports, life: Life) -> dict[str, Command]:
    """The control channel's commands (engine/live/commands.py); status adds the clients connected."""
    table = command_table(served, life.hello)
    status = table["status"]

    async def with_clients(args: dict[str, Any], emit: Emit) -> Any:
        answer = await status.run(args, emit)
        answer["clients"] = [client.snapshot() for client in exports.clients.values()]
        return answer

    table["status"] = dataclasses.replace(status, run=with_clients)
    return table


async def _accept(listener: trio.SocketListener, exports: Exports, stopping: trio.Event,
                  nursery: trio.Nursery) -> None:
    while not stopping.is_set():
        try:
            stream = await listener.accept()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        except OSError as exc:  # EMFILE and friends: wait a little rather than spin
            log.warning("accept: %s", exc)
            await trio.sleep(0.1)
            continue
        nursery.start_soon(handle_client, stream, exports, stopping)
