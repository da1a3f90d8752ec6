"""The NBD server's lifecycle: open the images, listen, serve clients, and on SIGTERM close everything cleanly.

Every image is opened once, as an AsyncDisk, and shared by all connections (which is what lets the
exports advertise CAN_MULTI_CONN). A writable image is locked exactly as a mounted one, so a second
writer, mount or server, is refused. Stopping (SIGTERM/SIGINT/SIGHUP, or ``vhdxfs stop``): the listeners
close, each connection stops reading requests and finishes those in flight, then every image is flushed
and closed (log applied, LogGuid cleared) and the pid record removed. Signals are watched for the whole
life of the daemon, so a second one cannot cut the close short.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass, field

import trio

from ..engine.aio import close_disks, open_disks
from ..errors import VhdxError
from ..service.daemon import Ready
from ..service.notify import sd_notify
from ..service.records import record_path, write_record
from ..service.signals import run_until_stopped
from . import listeners as lsn
from .connection import handle_client
from .exports import Export, Exports, export_name
from .transmission import SERVER_BUDGET, ByteBudget

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
    return f"unix:{os.path.realpath(config.socket)}"


def state_file(config: ServeConfig):
    return record_path(address_key(config), ".nbd.pid")


def _listening_sockets(config: ServeConfig, tls: bool) -> tuple[list, str | None]:
    """The sockets to serve on, and the unix socket path this server made (to remove when it stops)."""
    made = None
    socks = lsn.inherited_sockets()
    if socks:  # socket activation: the server is known by the socket systemd gave it (records, vhdxfs stop)
        name = socks[0].getsockname()
        if isinstance(name, str):
            config.socket, config.listen = name, None
        else:
            host = name[0]
            config.listen = f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"
    else:
        if config.listen:
            socks = lsn.tcp_sockets(*lsn.parse_address(config.listen))
        else:
            socks, made = [lsn.unix_socket(config.socket)], config.socket
    try:
        for sock in socks:
            lsn.check_plaintext(sock, tls, config.insecure_no_tls)
    except BaseException:
        lsn.close_all(socks)
        raise
    return socks, made


class Clients:
    """The server's connections, so a stop can tell each to finish what it has in flight."""

    def __init__(self) -> None:
        self.stopping = trio.Event()


async def serve(config: ServeConfig, ready: Ready) -> None:
    """Open, listen, call ``ready(None)`` (or ``ready(message)`` on failure), serve until told to stop."""
    clients = Clients()

    def on_signal(name: str) -> None:
        log.info("%s: finishing the requests in flight, then closing the images", name)
        clients.stopping.set()

    await run_until_stopped(functools.partial(_serve, config, ready, clients), on_signal)


async def _serve(config: ServeConfig, ready: Ready, clients: Clients) -> None:
    try:
        tls = lsn.tls_context(config.tls_cert, config.tls_key, config.tls_ca)
        socks, made = _listening_sockets(config, tls is not None)
    except VhdxError as exc:
        ready(str(exc))
        return
    try:
        disks = await open_disks(config.images, read_only=config.read_only, parent=config.parent)
    except VhdxError as exc:
        lsn.close_all(socks)
        if made:
            with contextlib.suppress(OSError):
                os.unlink(made)
        ready(str(exc))
        return
    exports = Exports({export_name(d.path): Export(export_name(d.path), d) for d in disks}, tls,
                      config.handshake_timeout)
    exports.budget = ByteBudget(SERVER_BUDGET)  # the data in flight of all connections: bounded with many
    pidfile = state_file(config)
    try:
        async with trio.open_nursery() as nursery:
            listeners = lsn.trio_listeners(socks)
            for listener in listeners:
                nursery.start_soon(_accept, listener, exports, clients, nursery)
            try:
                write_record(pidfile, address_key(config))
            except OSError as exc:
                log.warning("cannot record the daemon pid in %s: %s", pidfile, exc)
            log.info("serving %s on %s", ", ".join(exports.by_name), address_key(config))
            ready(None)
            sd_notify("READY=1\nSTATUS=serving " + ", ".join(exports.by_name))
            await clients.stopping.wait()
            sd_notify("STOPPING=1")
            for listener in listeners:
                await listener.aclose()
            # The connections see `stopping`, finish their requests and close: the nursery waits for them.
    finally:
        with trio.CancelScope(shield=True):
            await close_disks(disks)
        if made:
            try:
                os.unlink(made)
            except OSError:
                pass
        pidfile.unlink(missing_ok=True)


async def _accept(listener: trio.SocketListener, exports: Exports, clients: Clients, nursery) -> None:
    while not clients.stopping.is_set():
        try:
            stream = await listener.accept()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        except OSError as exc:  # EMFILE and friends: wait a little rather than spin
            log.warning("accept: %s", exc)
            await trio.sleep(0.1)
            continue
        nursery.start_soon(handle_client, stream, exports, clients.stopping)
