"""The server's life as a user and as systemd see it: `vhdxfs serve` returns once it listens, on a socket
only its owner can use; SIGTERM and `vhdxfs stop` end it with every image closed cleanly (stop returns
only then); start-up errors name what is wrong; --foreground speaks sd_notify; socket activation serves
on the inherited socket; the unit files pass systemd-analyze verify.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import make_image, need_tools, qemu_check_clean, run, vhdxfs
from tests.nbd.conftest import Server, free_port
from tests.nbd.rawclient import RawClient, ServerClosed
from vhdxfs.engine import Disk, describe
from vhdxfs.nbd import protocol as p
from vhdxfs.nbd.server import ServeConfig, address_key, state_file
from vhdxfs.service.records import STATE_DIR, read_record

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
KiB = 1 << 10


def daemon_pid(server: Server) -> int:
    """The pid the server recorded for `vhdxfs stop`."""
    config = ServeConfig(images=[], socket=str(server.socket)) if server.socket else \
        ServeConfig(images=[], listen=server.address)
    pid = read_record(state_file(config), address_key(config))
    assert pid is not None, f"no record of a server on {server.address}"
    return pid


def wait_gone(pid: int, timeout: float = 30) -> float:
    """Seconds until ``pid`` is gone (or a zombie: it has closed everything)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(") ", 1)[1].split()[0] in "ZX":
                    return time.monotonic() - start
        except FileNotFoundError:
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still running after {timeout} s")


def log_state(image: Path) -> str:
    return describe(image)["log-state"]


def assert_clean(image: Path) -> None:
    result = vhdxfs("info", image)
    assert result.returncode == 0 and "log: clean" in result.stdout, result.stdout + result.stderr
    result = vhdxfs("check", image)
    assert result.returncode == 0, result.stdout + result.stderr
    qemu_check_clean(image)


def pattern(n: int, size: int) -> bytes:
    return bytes([n % 251 + 1]) * size


def start(*args: str | os.PathLike, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdxfs.cli", "serve", *map(str, args)], capture_output=True,
                          text=True, **kw)


# -- starting ---------------------------------------------------------------------------------------------


def test_serve_returns_once_it_listens_on_a_private_socket(tmp_path, nbd_tools):
    """A client works the moment the command returns, with no retry; the socket is 0600 and the caller's
    whatever the umask, and goes away when the server stops."""
    image = make_image(tmp_path / "ready.vhdx", 8 * MiB)
    sock = tmp_path / "ready.sock"
    result = start(image, "--socket", sock, umask=0)
    assert result.returncode == 0, result.stderr
    try:
        with RawClient(sock) as c:  # no retry: it listens already
            assert c.connect().size == 8 * MiB
        info = sock.lstat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)
        assert (info.st_uid, info.st_gid) == (os.geteuid(), os.getegid())
        assert f"nbd+unix:///ready?socket={sock}" in result.stdout  # what to give qemu-img, nbdinfo, nbdcopy
    finally:
        assert vhdxfs("stop", sock).returncode == 0
    assert not sock.exists()


def test_serve_over_tcp_returns_once_it_listens(tmp_path, nbd_tools):
    image = make_image(tmp_path / "tcp.vhdx", 8 * MiB)
    port = free_port()
    result = vhdxfs("serve", image, "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 0, result.stderr
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # no retry
            assert s.recv(8) == b"NBDMAGIC"
        assert run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/").stdout.strip() == str(8 * MiB)
        assert f"nbd://127.0.0.1:{port}/tcp" in result.stdout
    finally:
        assert vhdxfs("stop", f"127.0.0.1:{port}").returncode == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


# -- stopping ---------------------------------------------------------------------------------------------


def started(tmp_path: Path, *images: Path) -> Server:
    """A daemon on a socket in tmp_path that the test itself ends (so not the ``serve`` fixture)."""
    sock = tmp_path / "own.sock"
    result = vhdxfs("serve", *images, "--socket", sock)
    assert result.returncode == 0, result.stderr
    return Server(str(sock), sock, None)


def test_sigterm_closes_every_image_cleanly(tmp_path, nbd_tools):
    """Writes never flushed by the client, two images, an idle client still connected and another in the
    middle of its handshake: SIGTERM still ends the daemon promptly with both images clean and every
    acknowledged write in them."""
    a = make_image(tmp_path / "a.vhdx", 32 * MiB, block_size=1 * MiB)
    b = make_image(tmp_path / "b.vhdx", 32 * MiB, block_size=1 * MiB)
    server = started(tmp_path, a, b)
    pid = daemon_pid(server)
    try:
        for i, name in enumerate(("a", "b")):
            with RawClient(server.socket) as c:
                c.connect(name=name)
                for n in range(20):
                    assert c.write(n * MiB + 4 * KiB * i, pattern(n + i, 64 * KiB)).error == 0
                c.disconnect()
        idle = RawClient(server.socket)
        idle.connect(name="a")
        shaking = RawClient(server.socket)
        shaking.greeting()
        try:
            os.kill(pid, signal.SIGTERM)
            assert wait_gone(pid) < 10
            assert idle.closed_by_server(1) and shaking.closed_by_server(1)
        finally:
            idle.close()
            shaking.close()
    finally:
        vhdxfs("stop", server.address)  # (when the test failed before its SIGTERM)
    assert not server.socket.exists()
    for i, image in enumerate((a, b)):
        assert_clean(image)
        with Disk.open(image, read_only=True) as disk:
            for n in range(20):
                assert disk.read(n * MiB + 4 * KiB * i, 64 * KiB) == pattern(n + i, 64 * KiB), (image, n)


def test_requests_in_flight_at_sigterm_finish(tmp_path, nbd_tools):
    """A client with 64 writes in flight when SIGTERM comes: every write the server acknowledged is in
    the image after it stops (the stop waits for requests in flight, then flushes and closes)."""
    image = make_image(tmp_path / "flight.vhdx", 64 * MiB, block_size=1 * MiB)
    server = started(tmp_path, image)
    pid = daemon_pid(server)
    acked = []
    try:
        with RawClient(server.socket) as c:
            c.connect()
            cookies = {c.request(p.CMD_WRITE, n * MiB, data=pattern(n, 256 * KiB)): n for n in range(64)}
            os.kill(pid, signal.SIGTERM)
            try:
                while len(acked) < len(cookies):
                    reply = c.reply()
                    assert reply.error == 0
                    acked.append(cookies[reply.cookie])
            except (ServerClosed, ConnectionError):
                pass
            assert wait_gone(pid) < 10
    finally:
        vhdxfs("stop", server.address)
    assert acked, "the server acknowledged none of the writes it had received"
    assert_clean(image)
    with Disk.open(image, read_only=True) as disk:
        for n in acked:
            assert disk.read(n * MiB, 256 * KiB) == pattern(n, 256 * KiB), n


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_stop_returns_once_the_image_is_clean_and_unlocked(tmp_path, nbd_tools, tcp):
    image = make_image(tmp_path / "stop.vhdx", 64 * MiB, block_size=1 * MiB)
    sock = tmp_path / "stop.sock"
    where = ["--listen", f"127.0.0.1:{free_port()}"] if tcp else ["--socket", sock]
    assert vhdxfs("serve", image, *where).returncode == 0
    address = str(where[1])
    idle = None
    try:
        result = run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 8M", "-c", "write -P 0x44 40M 3M",
                     f"nbd://{address}/" if tcp else f"nbd+unix:///?socket={sock}")
        assert result.returncode == 0, result.stderr
        if not tcp:
            idle = RawClient(sock)  # a client that stays connected, its last write never flushed
            idle.connect()
            assert idle.write(50 * MiB + 512, b"unflushed" * 1000).error == 0
        started = time.monotonic()
        result = vhdxfs("stop", address)
        took = time.monotonic() - started
        # At once, before anything else can happen: the log is clean and a writer can have the image.
        state = log_state(image)
        with Disk.open(image) as disk:
            assert disk.read(0, 8 * MiB) == b"\x33" * 8 * MiB
            assert disk.read(40 * MiB, 3 * MiB) == b"\x44" * 3 * MiB
            if not tcp:
                assert disk.read(50 * MiB + 512, 9000) == b"unflushed" * 1000
        assert result.returncode == 0, result.stderr
        assert state == "clean"
        assert took < 10
        if idle is not None:
            assert idle.closed_by_server(1)
    finally:
        if idle is not None:
            idle.close()
        vhdxfs("stop", address)  # (a no-op unless the test failed before its stop)
    assert_clean(image)


def test_stop_where_nobody_serves_says_so(tmp_path, nbd_tools):
    for address in (str(tmp_path / "nobody.sock"), f"127.0.0.1:{free_port()}"):
        result = vhdxfs("stop", address)
        assert result.returncode == 1
        assert address in result.stderr and "no vhdxfs NBD server" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    # A socket file that is left over (its server was killed) is no server either.
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    result = vhdxfs("stop", stale)
    assert result.returncode == 1 and "no vhdxfs NBD server" in result.stderr, result.stderr


# -- start-up errors --------------------------------------------------------------------------------------


def test_a_missing_image_fails_at_start_naming_the_file(tmp_path, nbd_tools):
    good = make_image(tmp_path / "good.vhdx", 8 * MiB)
    missing = tmp_path / "missing.vhdx"
    sock = tmp_path / "m.sock"
    for images in ([missing], [good, missing]):
        result = vhdxfs("serve", *images, "--socket", sock)
        assert result.returncode == 1
        assert str(missing) in result.stderr and "no such image file" in result.stderr, result.stderr
        assert not sock.exists()
    not_vhdx = tmp_path / "notes.vhdx"
    not_vhdx.write_bytes(b"not a disk image\n" * 4096)
    result = vhdxfs("serve", good, not_vhdx, "--socket", sock)
    assert result.returncode == 1 and str(not_vhdx) in result.stderr, result.stderr
    with Disk.open(good):  # the image a failed start opened first is not left locked
        pass


def test_a_start_that_fails_opening_an_image_leaves_no_socket_behind(tmp_path, nbd_tools):
    """The socket is made before the images are opened; when one cannot be, the server closes the socket
    but leaves its file (server.py, the `except VhdxError` after `_open`), so a script that waits for the
    socket to appear is fooled, and the path looks served until the next server removes it as stale."""
    image = make_image(tmp_path / "held.vhdx", 8 * MiB)
    sock = tmp_path / "failed.sock"
    with Disk.open(image):  # a writer holds it
        result = vhdxfs("serve", image, "--socket", sock)
    assert result.returncode == 1 and str(image) in result.stderr, result.stderr
    assert not sock.exists()


def test_two_images_with_the_same_stem_are_refused(tmp_path, nbd_tools):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    one = make_image(tmp_path / "x" / "disk.vhdx", 8 * MiB)
    two = make_image(tmp_path / "y" / "disk.vhdx", 8 * MiB)
    sock = tmp_path / "same.sock"
    result = vhdxfs("serve", one, two, "--socket", sock)
    assert result.returncode == 1
    assert str(one) in result.stderr and str(two) in result.stderr and "'disk'" in result.stderr, result.stderr
    assert not sock.exists()


def test_an_image_a_writer_holds_is_refused(tmp_path, serve):
    image = make_image(tmp_path / "held.vhdx", 8 * MiB)
    with serve(image):
        result = vhdxfs("serve", image, "--socket", tmp_path / "second.sock")
        assert result.returncode == 1 and str(image) in result.stderr, result.stderr
    with Disk.open(image):
        result = vhdxfs("serve", image, "--socket", tmp_path / "third.sock")
        assert result.returncode == 1 and str(image) in result.stderr, result.stderr
    # Read-only servers share it with each other.
    with serve("-o", "ro", image) as first, serve("-o", "ro", image) as second:
        for server in (first, second):
            with RawClient(server.socket) as c:
                assert c.connect().flags & p.TFLAG_READ_ONLY


def test_a_socket_another_server_listens_on_is_not_taken_over(tmp_path, serve):
    one = make_image(tmp_path / "one.vhdx", 8 * MiB)
    two = make_image(tmp_path / "two.vhdx", 8 * MiB)
    with serve(one) as server:
        result = vhdxfs("serve", two, "--socket", server.socket)
        assert result.returncode == 1 and "another server" in result.stderr, result.stderr
        with RawClient(server.socket) as c:  # the first server still has its socket
            assert c.connect(name="one").size == 8 * MiB


# -- systemd: sd_notify, socket activation, the units -----------------------------------------------------


def notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(20)
    return sock, address


def test_foreground_notifies_ready_and_stopping(tmp_path, nbd_tools):
    image = make_image(tmp_path / "svc.vhdx", 16 * MiB)
    sock = tmp_path / "svc.sock"
    notify, address = notify_socket(tmp_path)
    daemon = subprocess.Popen([sys.executable, "-m", "vhdxfs.cli", "serve", "--foreground", str(image), "--socket",
                               str(sock)], env=dict(os.environ, NOTIFY_SOCKET=address), stderr=subprocess.PIPE,
                              text=True)
    try:
        message = notify.recv(4096).decode()
        assert "READY=1" in message, message
        with RawClient(sock) as c:  # ready means listening
            c.connect()
            assert c.write(0, b"notified").error == 0
            c.disconnect()
        daemon.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.recv(4096).decode()
        assert daemon.wait(timeout=30) == 0
        assert "closed cleanly" in daemon.stderr.read()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        daemon.stderr.close()
        notify.close()
    assert not sock.exists()
    assert_clean(image)


def test_foreground_notifies_no_ready_when_it_cannot_start(tmp_path, nbd_tools):
    image = make_image(tmp_path / "busy.vhdx", 8 * MiB)
    notify, address = notify_socket(tmp_path)
    notify.settimeout(0.5)
    try:
        with Disk.open(image):  # held by a writer: the server cannot open it
            result = subprocess.run([sys.executable, "-m", "vhdxfs.cli", "serve", "--foreground", str(image),
                                     "--socket", str(tmp_path / "busy.sock")], env=dict(os.environ,
                                    NOTIFY_SOCKET=address), capture_output=True, text=True, timeout=30)
        assert result.returncode == 1 and str(image) in result.stderr, result.stderr
        messages = []
        try:
            while True:
                messages.append(notify.recv(4096))
        except TimeoutError:
            pass
        assert not any(b"READY=1" in m for m in messages), messages
    finally:
        notify.close()


def activated(tmp_path: Path, listen: str, image: Path, *, notify: str | None = None) -> subprocess.Popen:
    """systemd-socket-activate listening on ``listen``: it passes the socket as fd 3 (LISTEN_FDS=1) to
    `vhdxfs serve --foreground IMAGE` once the first client connects."""
    need_tools("systemd-socket-activate")
    env = dict(os.environ)
    if notify:
        env["NOTIFY_SOCKET"] = notify
    # It gives the server a fresh environment: only LISTEN_* and what -E names.
    passed = [f"-E{name}" for name in ("PATH", "PYTHONPATH", "NOTIFY_SOCKET", "VHDXFS_STATE_DIR")
              if name in env]
    vhdxfs_bin = Path(sys.executable).parent / "vhdxfs"
    launcher = subprocess.Popen(["systemd-socket-activate", *passed, "-l", listen, str(vhdxfs_bin), "serve",
                                 "--foreground", str(image)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while "Listening on" not in (line := launcher.stderr.readline()):
        assert line and time.monotonic() < deadline, "systemd-socket-activate did not start"
    return launcher


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_socket_activation_serves_on_the_inherited_socket(tmp_path, nbd_tools, tcp):
    """The server takes over the socket it is given (and leaves it in place when it stops: it belongs to
    the .socket unit), makes none of its own, and serves on it from the first client on."""
    image = make_image(tmp_path / "act.vhdx", 16 * MiB)
    sock = tmp_path / "act.sock"
    listen = f"127.0.0.1:{free_port()}" if tcp else str(sock)
    notify, address = notify_socket(tmp_path)
    launcher = activated(tmp_path, listen, image, notify=address)
    try:
        # The first client is the one that makes systemd-socket-activate start the server: it waits in
        # the backlog meanwhile and is served by the new server.
        uri = f"nbd://{listen}/" if tcp else f"nbd+unix:///?socket={sock}"
        result = run("qemu-io", "-f", "raw", "-c", "write -P 0x61 1M 1M", "-c", "read -P 0x61 1M 1M", uri)
        assert result.returncode == 0 and "verification failed" not in result.stdout, result
        assert "READY=1" in notify.recv(4096).decode()
        assert run("nbdinfo", "--size", uri).stdout.strip() == str(16 * MiB)
        assert not (STATE_DIR / "act.sock").exists()  # it made no socket of its own (the default place)
        launcher.send_signal(signal.SIGTERM)  # systemd stops the service with SIGTERM
        assert "STOPPING=1" in notify.recv(4096).decode()
        assert launcher.wait(timeout=30) == 0
        log = launcher.stderr.read()
        assert "closed cleanly" in log, log
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        launcher.stderr.close()
        notify.close()
    if not tcp:
        assert sock.exists()  # the socket unit's, not the server's to remove
    assert_clean(image)
    with Disk.open(image, read_only=True) as disk:
        assert disk.read(1 * MiB, 1 * MiB) == b"\x61" * MiB


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_stop_finds_a_socket_activated_server_by_its_socket(tmp_path, nbd_tools, tcp):
    """`vhdxfs stop SOCKET|HOST:PORT` stops the server listening there, also when systemd gave it the
    socket. Today the server records (and logs) the address it would have made itself from its
    arguments, $STATE_DIR/<export>.sock, not the inherited one: stop on the real socket says "no vhdxfs
    NBD server is recorded as serving here", and two activated servers of images with the same stem
    share one record."""
    image = make_image(tmp_path / "found.vhdx", 8 * MiB)
    sock = tmp_path / "found.sock"
    listen = f"127.0.0.1:{free_port()}" if tcp else str(sock)
    launcher = activated(tmp_path, listen, image)
    try:
        uri = f"nbd://{listen}/" if tcp else f"nbd+unix:///?socket={sock}"
        assert run("nbdinfo", "--size", uri).returncode == 0  # starts it
        result = vhdxfs("stop", listen)
        assert result.returncode == 0, result.stderr
        assert launcher.wait(timeout=5) == 0
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(timeout=30)
        launcher.stderr.close()
    assert log_state(image) == "clean"


def test_the_nbd_units_pass_systemd_analyze_verify(tmp_path):
    need_tools("systemd-analyze")
    vhdxfs_bin = Path(sys.executable).parent / "vhdxfs"
    for name in ("vhdxfs-nbd@.socket", "vhdxfs-nbd@.service"):
        text = (REPO / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/vhdxfs", str(vhdxfs_bin)))
    units = [tmp_path / "vhdxfs-nbd@vm1.socket", tmp_path / "vhdxfs-nbd@vm1.service"]
    result = run("systemd-analyze", "verify", *units)
    assert result.returncode == 0, result.stderr
    assert "vhdxfs-nbd@" not in result.stderr, result.stderr  # no complaint about our units
    # verify does look: a typo in either unit is reported.
    service = (tmp_path / "vhdxfs-nbd@.service").read_text()
    (tmp_path / "vhdxfs-nbd@.service").write_text(service.replace("Type=notify", "Type=notifyy"))
    assert "notifyy" in run("systemd-analyze", "verify", *units).stderr
    (tmp_path / "vhdxfs-nbd@.service").write_text(service)
    socket_unit = (tmp_path / "vhdxfs-nbd@.socket").read_text()
    (tmp_path / "vhdxfs-nbd@.socket").write_text(socket_unit.replace("Accept=no", "Accept=perhaps"))
    assert "perhaps" in run("systemd-analyze", "verify", *units).stderr


def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (REPO / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_units_activate_a_notifying_foreground_server_that_stops_cleanly():
    sock, service = unit_settings("vhdxfs-nbd@.socket"), unit_settings("vhdxfs-nbd@.service")
    assert sock["SocketMode"] == ["0600"] and sock["Accept"] == ["no"]  # one server takes the listening socket
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert "serve --foreground" in service["ExecStart"][0]  # the main process is the one that notifies
    assert "--socket" not in service["ExecStart"][0] and "--listen" not in service["ExecStart"][0]
    assert service["KillSignal"] == ["SIGTERM"]  # the daemon's clean close
    assert service["Requires"] == ["vhdxfs-nbd@%i.socket"]
    assert "AF_UNIX" in service["RestrictAddressFamilies"][0]  # the notify socket and unix clients


def test_a_client_that_never_finishes_its_handshake_is_disconnected(tmp_path, serve):
    image = make_image(tmp_path / "slow.vhdx", 8 * MiB)
    with serve(image, "--handshake-timeout", "0.5") as server:
        with RawClient(server.socket) as silent, RawClient(server.socket) as haggling:
            silent.greeting()  # says nothing at all
            haggling.handshake()
            haggling.structured_replies()  # starts, then dawdles
            started = time.monotonic()
            assert silent.closed_by_server(5) and haggling.closed_by_server(5)
            assert time.monotonic() - started < 3
        with RawClient(server.socket) as c:  # the time-out is the handshake's: transmission has none
            c.connect()
            time.sleep(0.8)
            assert c.write(0, b"late").error == 0
            assert c.read(0, 4).data == b"late"
