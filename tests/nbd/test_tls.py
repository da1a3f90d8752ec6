"""TLS: a server given --tls-cert/--tls-key serves only clients that use TLS (QEMU, libnbd, a raw client
doing STARTTLS), with --tls-ca only those presenting a certificate the CA signed; and plain TCP off
loopback is refused unless the user says --insecure-no-tls.

The certificates are made with openssl once per module: a CA, a server certificate for localhost and
127.0.0.1, a client certificate, and one from another CA. QEMU and libnbd both take a directory holding
ca-cert.pem, client-cert.pem and client-key.pem.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import make_image, need_tools, qemu_check_clean, run, vhdxfs
from tests.nbd.conftest import Server, free_port
from tests.nbd.rawclient import RawClient, ServerClosed, info_data
from vhdxfs.engine import Disk
from vhdxfs.nbd import protocol as p

MiB = 1 << 20

EXTENSIONS = """\
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


@dataclass
class Pki:
    ca: Path  # the CA certificate the server trusts with --tls-ca
    cert: Path  # the server's certificate and key
    key: Path
    client: Path  # ca-cert.pem, client-cert.pem, client-key.pem: a client the CA vouches for
    anonymous: Path  # ca-cert.pem only: a TLS client without a certificate
    stranger: Path  # ca-cert.pem and a client certificate signed by another CA


def _openssl(*args: str | Path) -> None:
    result = run("openssl", *args)
    assert result.returncode == 0, result.stderr


def _ca(where: Path, name: str) -> tuple[Path, Path]:
    cert, key = where / f"{name}-cert.pem", where / f"{name}-key.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
             "-out", cert, "-days", "2", "-subj", f"/CN={name}", "-config", where / "ext.cnf", "-extensions", "ca")
    return cert, key


def _signed(where: Path, name: str, kind: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    cert, key, csr = where / f"{name}-cert.pem", where / f"{name}-key.pem", where / f"{name}.csr"
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
             "-out", csr, "-subj", f"/CN={'localhost' if kind == 'server' else name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-out", cert, "-days", "2",
             "-extfile", where / "ext.cnf", "-extensions", kind)
    return cert, key


def _client_dir(where: Path, ca: Path, cert_key: tuple[Path, Path] | None) -> Path:
    where.mkdir()
    (where / "ca-cert.pem").write_bytes(ca.read_bytes())
    if cert_key is not None:
        (where / "client-cert.pem").write_bytes(cert_key[0].read_bytes())
        (where / "client-key.pem").write_bytes(cert_key[1].read_bytes())
        (where / "client-key.pem").chmod(0o600)
    return where


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    need_tools("openssl")
    where = tmp_path_factory.mktemp("pki")
    (where / "ext.cnf").write_text(EXTENSIONS)
    ca = _ca(where, "ca")
    other_ca = _ca(where, "other-ca")
    server = _signed(where, "server", "server", ca)
    client = _signed(where, "client", "client", ca)
    stranger = _signed(where, "stranger", "client", other_ca)
    return Pki(ca[0], *server, _client_dir(where / "client", ca[0], client),
               _client_dir(where / "anonymous", ca[0], None), _client_dir(where / "stranger", ca[0], stranger))


def tls_args(pki: Pki, ca: bool = False) -> list[str | Path]:
    return ["--tls-cert", pki.cert, "--tls-key", pki.key, *(["--tls-ca", pki.ca] if ca else [])]


def nbds(server: Server, certificates: Path, export: str = "") -> str:
    """The libnbd URI of ``export`` over TLS with the client files in ``certificates``."""
    uri = server.uri(export, scheme="nbds")
    return f"{uri}{'&' if '?' in uri else '?'}tls-certificates={certificates}"


def qemu_opts(server: Server, export: str, tls: bool = True) -> str:
    """--image-opts of ``export`` for qemu-img/qemu-io, with the tls-creds object tls0 when ``tls``."""
    if server.socket is not None:
        # Over a unix socket QEMU has no host name to check the server's certificate against: give it one.
        where = f"server.type=unix,server.path={server.socket}" + (",tls-hostname=localhost" if tls else "")
    else:
        where = f"server.type=inet,server.host=127.0.0.1,server.port={server.port}"
    return f"driver=nbd,{where},export={export}" + (",tls-creds=tls0" if tls else "")


def qemu(command: list[str], certificates: Path | None, opts: str) -> subprocess.CompletedProcess:
    """``command`` (e.g. ["qemu-img", "info"]) on the image ``opts`` describe, with the client files of
    ``certificates`` as the tls-creds object tls0."""
    creds = ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certificates}"] if certificates else []
    return run(*command, *creds, "--image-opts", opts)


def nbdinfo(*args: str) -> subprocess.CompletedProcess:
    """nbdinfo with libnbd's debug output, which carries the server's error messages (libnbd 1.14 turns
    NBD_REP_ERR_TLS_REQD into a bare "Operation not supported")."""
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, env=dict(os.environ, LIBNBD_DEBUG="1"),
                          timeout=30)


def _assert_refused(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0, result.stdout
    assert any(w in result.stderr for w in words), result.stderr[-3000:]


# -- QEMU and libnbd over TLS -----------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [True, False], ids=["tcp", "unix"])
def test_qemu_and_nbdinfo_use_tls_and_plain_clients_are_refused(tmp_path, serve, pki, tcp):
    image = make_image(tmp_path / "secret.vhdx", 32 * MiB, block_size=1 * MiB)
    with serve(image, *tls_args(pki), tcp=tcp) as server:
        opts = qemu_opts(server, "secret")
        result = qemu(["qemu-img", "info", "--output=json"], pki.client, opts)
        assert result.returncode == 0, result.stderr
        assert '"virtual-size": 33554432' in result.stdout
        result = qemu(["qemu-io", "-c", "write -P 0x5a 1000 70000", "-c", "read -P 0x5a 1000 70000",
                       "-c", "flush"], pki.client, opts)
        assert result.returncode == 0 and "Pattern verification failed" not in result.stdout, result
        # libnbd checks the server's certificate against the CA; without --tls-ca the server asks for no
        # client certificate, so a client that has none is served too.
        for certificates in (pki.client, pki.anonymous):
            result = nbdinfo("--json", nbds(server, certificates))
            assert result.returncode == 0, result.stderr[-3000:]
            assert '"TLS": true' in result.stdout and '"export-size": 33554432' in result.stdout
        assert nbdinfo("--is", "tls", nbds(server, pki.client)).returncode == 0
        # Without TLS: refused, and the client learns why.
        _assert_refused(nbdinfo(server.uri()), "TLS is required")
        _assert_refused(qemu(["qemu-img", "info"], None, qemu_opts(server, "secret", tls=False)), "TLS")
        if server.socket is not None:
            with RawClient(server.socket) as c:  # a raw client gets the protocol's answer
                c.handshake()
                replies = c.option(p.OPT_GO, info_data("secret"))
                assert replies[-1].type == p.REP_ERR_TLS_REQD
                assert b"TLS" in replies[-1].data
    with Disk.open(image, read_only=True) as disk:
        assert disk.read(1000, 70000) == b"\x5a" * 70000
    qemu_check_clean(image)


def test_nbdcopy_over_tls_round_trips_the_data(tmp_path, serve, pki):
    """Many connections (multi-conn) and many requests in flight over TLS: the bytes come back the same."""
    image = make_image(tmp_path / "copy.vhdx", 24 * MiB, block_size=1 * MiB)
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(24 * MiB))
    with serve(image, *tls_args(pki, ca=True), tcp=True) as server:
        result = run("nbdcopy", "--flush", source, nbds(server, pki.client))
        assert result.returncode == 0, result.stderr
        back = tmp_path / "back.raw"
        result = run("nbdcopy", nbds(server, pki.client), back)
        assert result.returncode == 0, result.stderr
        assert back.read_bytes() == source.read_bytes()
    qemu_check_clean(image)


# -- --tls-ca: clients must present a certificate the CA signed -------------------------------------------


@pytest.mark.parametrize("tcp", [True, False], ids=["tcp", "unix"])
def test_with_tls_ca_only_clients_with_a_certificate_of_the_ca_are_served(tmp_path, serve, pki, tcp):
    image = make_image(tmp_path / "vault.vhdx", 8 * MiB)
    with serve(image, *tls_args(pki, ca=True), tcp=tcp) as server:
        result = nbdinfo("--json", nbds(server, pki.client))
        assert result.returncode == 0, result.stderr[-3000:]
        assert '"TLS": true' in result.stdout
        result = qemu(["qemu-io", "-c", "write -P 0x17 0 4096", "-c", "read -P 0x17 0 4096"], pki.client,
                      qemu_opts(server, "vault"))
        assert result.returncode == 0 and "Pattern verification failed" not in result.stdout, result
        # TLS without a client certificate, or with one another CA signed: the handshake fails.
        for certificates in (pki.anonymous, pki.stranger):
            assert nbdinfo(nbds(server, certificates)).returncode != 0, certificates
        # (QEMU checks its own certificate against its CA before it connects: only the anonymous case
        # reaches the server.)
        result = qemu(["qemu-img", "info"], pki.anonymous, qemu_opts(server, "vault"))
        _assert_refused(result, "TLS")
        _assert_refused(nbdinfo(server.uri()), "TLS is required")
        # The refusals cost their own connections only: a good client is still served.
        assert nbdinfo("--is", "tls", nbds(server, pki.client)).returncode == 0
    qemu_check_clean(image)


def _starttls(c: RawClient, context: ssl.SSLContext) -> None:
    replies = c.option(p.OPT_STARTTLS)
    assert replies[-1].type == p.REP_ACK, replies
    c.sock = context.wrap_socket(c.sock, server_hostname="localhost")


def _client_context(pki: Pki, certificate: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if certificate is not None:
        context.load_cert_chain(certificate / "client-cert.pem", certificate / "client-key.pem")
    return context


def test_the_handshake_is_forced_tls_for_a_raw_client(tmp_path, serve, pki):
    """FORCEDTLS as the protocol describes it: before STARTTLS every option gets NBD_REP_ERR_TLS_REQD and
    EXPORT_NAME ends the session; after it, GO enters transmission; with --tls-ca a client without a
    certificate is cut off in the handshake."""
    image = make_image(tmp_path / "raw.vhdx", 8 * MiB)
    with serve(image, *tls_args(pki, ca=True)) as server:
        with RawClient(server.socket) as c:
            c.handshake()
            for option, data in ((p.OPT_LIST, b""), (p.OPT_INFO, info_data("raw")), (p.OPT_STRUCTURED_REPLY, b"")):
                assert c.option(option, data)[-1].type == p.REP_ERR_TLS_REQD, option
            c.send_option(p.OPT_EXPORT_NAME, b"raw")
            assert c.closed_by_server()
        with RawClient(server.socket) as c:
            c.handshake()
            _starttls(c, _client_context(pki, pki.client))
            assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
            assert c.go("raw").size == 8 * MiB
            assert c.write(4096, b"tls" * 1000).error == 0
            assert c.command(p.CMD_FLUSH).error == 0
            assert c.read(4096, 3000).data == b"tls" * 1000
            c.disconnect()
        for certificate in (None, pki.stranger):
            with RawClient(server.socket) as c:
                c.handshake()
                with pytest.raises((ssl.SSLError, ServerClosed, ConnectionError)):  # not a time-out
                    _starttls(c, _client_context(pki, certificate))
                    c.go("raw")  # TLS 1.3: the server's refusal comes after the client's side of the handshake
    with Disk.open(image, read_only=True) as disk:
        assert disk.read(4096, 3000) == b"tls" * 1000


# -- start-up errors ------------------------------------------------------------------------------------------


def test_bad_tls_flags_are_refused_at_start(tmp_path, pki, nbd_tools):
    image = make_image(tmp_path / "flags.vhdx", 8 * MiB)
    sock = tmp_path / "flags.sock"
    cases = [
        (["--tls-cert", pki.cert], "--tls-key"),  # a certificate without its key
        (["--tls-ca", pki.ca], "--tls-cert"),  # a CA for no certificate
        (["--tls-cert", pki.cert, "--tls-key", pki.client / "client-key.pem"], str(pki.cert)),  # not its key
        (["--tls-cert", tmp_path / "missing.pem", "--tls-key", pki.key], "missing.pem"),
    ]
    for args, named in cases:
        result = vhdxfs("serve", image, "--socket", sock, *args)
        if result.returncode == 0:
            vhdxfs("stop", sock)
        assert result.returncode == 1, (args, result.stdout)
        assert named in result.stderr, (args, result.stderr)
        assert not sock.exists(), args  # nothing left listening
    # The image was never locked by a half-started server.
    with Disk.open(image):
        pass


def test_relative_tls_paths_are_taken_from_the_working_directory(tmp_path, pki, nbd_tools):
    """Like IMAGE and --socket, --tls-cert/--tls-key/--tls-ca are relative to where the command runs. The
    daemon changes its directory to / before it loads them, so today it fails: "server-cert.pem: cannot load
    the TLS certificate, key or CA: No such file or directory"."""
    make_image(tmp_path / "rel.vhdx", 8 * MiB)
    for name in ("server-cert.pem", "server-key.pem", "ca-cert.pem"):
        (tmp_path / name).write_bytes((pki.cert.parent / name).read_bytes())
    sock = tmp_path / "rel.sock"
    result = subprocess.run([sys.executable, "-m", "vhdxfs.cli", "serve", "rel.vhdx", "--socket", "rel.sock",
                             "--tls-cert", "server-cert.pem", "--tls-key", "server-key.pem", "--tls-ca", "ca-cert.pem"],
                            cwd=tmp_path, capture_output=True, text=True)
    try:
        assert result.returncode == 0, result.stderr
        assert nbdinfo("--is", "tls", nbds(Server(str(sock), sock, None), pki.client)).returncode == 0
    finally:
        if result.returncode == 0:
            assert vhdxfs("stop", sock).returncode == 0


# -- plain TCP off loopback -----------------------------------------------------------------------------------


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_plain_tcp_on_all_addresses_needs_insecure_no_tls(tmp_path, pki, nbd_tools):
    """Binds 0.0.0.0 but sends nothing anywhere but loopback, and stops at once."""
    image = make_image(tmp_path / "open.vhdx", 8 * MiB)
    port = free_port()
    address = f"0.0.0.0:{port}"
    result = vhdxfs("serve", image, "--listen", address)
    assert result.returncode == 1
    assert "--insecure-no-tls" in result.stderr and "0.0.0.0" in result.stderr, result.stderr
    assert not _listening(port)
    with Disk.open(image):  # not locked by the refused server
        pass
    for extra in (["--insecure-no-tls"], tls_args(pki)):
        result = vhdxfs("serve", image, "--listen", address, *extra)
        try:
            assert result.returncode == 0, (extra, result.stderr)
            assert ("nbds://" if extra != ["--insecure-no-tls"] else "nbd://") in result.stdout
            assert _listening(port)
        finally:
            stopped = vhdxfs("stop", address)
        assert stopped.returncode == 0, stopped.stderr
        assert not _listening(port)
    qemu_check_clean(image)


# -- what the server says about the clients it refuses ----------------------------------------------------------


def test_refused_and_departing_clients_are_not_logged_as_server_errors(tmp_path, pki, nbd_tools):
    """A client refused for want of TLS or of a certificate, or one that ends the negotiation itself
    (nbdinfo --list does, with NBD_OPT_ABORT), is routine: at most a debug line, never "ERROR: connection
    failed" with a traceback. Today the handshake runs inside a trio nursery, so Aborted, ProtocolError and
    Closed reach handle_client wrapped in an ExceptionGroup and miss its except clauses."""
    image = make_image(tmp_path / "quiet.vhdx", 8 * MiB)
    sock = tmp_path / "quiet.sock"
    daemon = subprocess.Popen([sys.executable, "-m", "vhdxfs.cli", "serve", "--foreground", str(image), "--socket",
                               str(sock), *map(str, tls_args(pki, ca=True))], stderr=subprocess.PIPE, text=True)
    try:
        server = Server(str(sock), sock, None)
        for _ in range(500):  # --foreground has no "ready" but sd_notify: wait for the socket
            if sock.exists():
                break
            assert daemon.poll() is None, daemon.stderr.read()
            time.sleep(0.01)
        assert nbdinfo(server.uri()).returncode != 0  # no TLS
        assert nbdinfo(nbds(server, pki.anonymous)).returncode != 0  # no certificate
        result = nbdinfo("--list", nbds(server, pki.client))  # served, then aborts the negotiation
        assert result.returncode == 0 and "quiet" in result.stdout, result.stderr[-3000:]
        with RawClient(sock) as c:
            c.handshake()
            c.send_option(p.OPT_EXPORT_NAME, b"quiet")  # before TLS: the server hangs up
            assert c.closed_by_server()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        log = daemon.stderr.read()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        daemon.stderr.close()
    assert "closed cleanly" in log, log
    assert "ERROR" not in log and "Traceback" not in log, log
