"""Where a server listens: a unix socket (the default, mode 0600), TCP on an explicit address, or the
sockets systemd passes (socket activation, LISTEN_FDS), and the TLS context the flags describe.

A TCP address that is not a loopback one is refused without TLS unless the user says
``--insecure-no-tls``: NBD has no authentication of its own, so anyone who reaches the port could read
and write the disk.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import ssl
import stat
from pathlib import Path

import trio

from ..errors import Reason, UsageError, VhdxError

DEFAULT_PORT = 10809
SD_LISTEN_FDS_START = 3


def parse_address(text: str) -> tuple[str, int]:
    """HOST[:PORT], [IPv6]:PORT, or :PORT (all addresses) -> (host, port)."""
    host, port = text, DEFAULT_PORT
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, raw = text.partition(":")
        port = _port(raw, text)
    return host, port


def _port(raw: str, text: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise UsageError(f"{text!r}: the port must be a number from 1 to 65535", field="--listen")
    return int(raw)


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host or None, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve {host!r}: {exc.strerror}", field="--listen") from None
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def tls_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    """x509 for the server; with ``ca``, clients must present a certificate it signed."""
    if not cert and not key and not ca:
        return None
    if not cert or not key:
        raise UsageError("TLS needs both --tls-cert and --tls-key", field="--tls-cert")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if ca:
            context.load_verify_locations(ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except OSError as exc:  # an ssl.SSLError too: its errno is OpenSSL's, not the system's
        code = exc.errno if exc.errno is not None and not isinstance(exc, ssl.SSLError) else errno.EINVAL
        raise UsageError(f"cannot load the TLS certificate, key or CA: {exc}", path=cert, errno=code) from None
    return context


def unix_socket(path: str) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600 from the start (made under umask 0177)."""
    target = Path(path)
    if target.exists() or target.is_symlink():
        if not stat.S_ISSOCK(target.lstat().st_mode):
            raise VhdxError("exists and is not a socket; remove it or choose another --socket", path=path,
                            errno=errno.EEXIST, reason=Reason.EXISTS)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise VhdxError("another server is listening on this socket", path=path, errno=errno.EADDRINUSE,
                            reason=Reason.EXISTS)
        except OSError:
            target.unlink()  # a stale socket of a server that is gone
        finally:
            probe.close()
    target.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise VhdxError(f"cannot listen: {exc.strerror}", path=path, errno=exc.errno, reason=Reason.HOST_IO) from None
    finally:
        os.umask(old)
    sock.listen(128)
    return sock


def tcp_sockets(host: str, port: int) -> list[socket.socket]:
    out = []
    try:
        for family, kind, proto, _name, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                      flags=socket.AI_PASSIVE):
            sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)
    except OSError as exc:
        for sock in out:
            sock.close()
        raise VhdxError(f"cannot listen on {host or '*'}:{port}: {exc.strerror}", errno=exc.errno,
                        reason=Reason.HOST_IO) from None
    return out


def inherited_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed us (LISTEN_PID is ours), or none."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    out = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        out.append(socket.socket(fileno=fd))
    return out


def check_plaintext(sock: socket.socket, tls: bool, insecure: bool) -> None:
    """Refuse a non-loopback TCP socket without TLS, unless the user insisted."""
    if tls or insecure or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    host = sock.getsockname()[0]
    if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
        raise UsageError(f"listening on {host} without TLS would let anyone who reaches the port read and write "
                         "the disk: give --tls-cert/--tls-key, listen on a loopback address, or say "
                         "--insecure-no-tls", field="--listen")


def trio_listeners(socks: list[socket.socket]) -> list[trio.SocketListener]:
    return [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks]


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()
