"""Hostile and broken clients of a daemon's control channel (vhdxfs/service/control.py), against a real
`vhdxfs serve` daemon, as test_hostile.py attacks its NBD side.

What the protocol can answer is answered (BadRequest, CommandNotFound, InvalidArgument) and the connection
goes on; what it cannot (a line over 64 KiB) gets one error line and the connection closes. A client that
vanishes (mid-line, mid-request, mid-merge) costs nothing: the merge it started finishes in the daemon.
After every hostile client a good one (`vhdxfs status`) is answered, qemu-io reads and writes the disk,
and once the server has stopped the image checks clean.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import make_image, vhdxfs
from vhdxfs.engine import check_image
from vhdxfs.service import control_protocol as cp
from vhdxfs.service.records import daemons

MiB = 1 << 20
SIZE = 64 * MiB


@pytest.fixture(autouse=True)
def bounded_stop(monkeypatch):
    monkeypatch.setenv("VHDXFS_STOP_TIMEOUT", "60")


class Line:
    """A raw client of the control socket: bytes out, lines in."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.sock.settimeout(30)
        self.reader = cp.LineReader(64 * MiB)
        self.lines: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def message(self) -> cp.Message:
        while not self.lines:
            data = self.sock.recv(1 << 16)
            assert data, "the daemon closed the connection"
            self.lines += self.reader.feed(data)
        return cp.parse_message(self.lines.pop(0))

    def answer(self) -> cp.Message:
        """The next return or error, events skipped."""
        while True:
            message = self.message()
            if message.kind in ("return", "error"):
                return message

    def closed_by_daemon(self) -> bool:
        try:
            while self.sock.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


def control_of(server) -> Path:
    [holder] = [h for h in daemons() if h.key == f"unix:{server.socket}"]
    assert holder.control is not None
    return holder.control


def good_clients(server) -> None:
    status = vhdxfs("status", server.socket, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["daemon"]["kind"] == "nbd"
    io = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a {SIZE - MiB} 64k",
                         "-c", f"read -P 0x5a {SIZE - MiB} 64k", server.uri()], capture_output=True, text=True,
                        timeout=60)
    assert io.returncode == 0 and "fail" not in (io.stdout + io.stderr).lower(), io.stdout + io.stderr


@pytest.fixture
def image(tmp_path):
    return make_image(tmp_path / "disk.vhdx", SIZE, block_size=MiB)


@contextlib.contextmanager
def hosted(serve, image) -> Iterator:
    with serve(image) as server:
        yield server
        good_clients(server)
    report = check_image(image)
    assert report["status"] == "clean" and not report["errors"], report


@pytest.fixture
def daemon(serve, image):
    with hosted(serve, image) as server:
        yield server


@pytest.fixture
def client(daemon):
    c = Line(control_of(daemon))
    assert c.message().kind == "greeting"
    yield c
    c.close()


def test_garbage_gets_bad_request_and_the_connection_goes_on(client):
    rnd = random.Random(3)
    bad = [b"garbage", b"\xff\xfe\x00", b"[1,2]", b"{\"execute\": 5}", b"{\"execute\": \"status\", \"id\": NaN}",
           b"[" * 30000, b"9" * 5000, b"{\"execute\":\"status\",\"extra\":1}",
           *(rnd.randbytes(rnd.randrange(1, 2000)).replace(b"\n", b"") for _ in range(20))]
    client.send(b"".join(line + b"\n" for line in bad))
    for _ in bad:
        message = client.answer()
        assert message.kind == "error" and message.value["class"] in (cp.BAD_REQUEST, cp.INVALID), message
    client.send(cp.request("status", rid="after"))
    answer = client.answer()
    assert answer.kind == "return" and answer.id == "after"


def test_unknown_commands_and_wrong_arguments_are_refused(client, image):
    cases = [("frobnicate", {}, cp.NOT_FOUND), ("resize", {"size": "lots"}, cp.INVALID),
             ("resize", {"size": True}, cp.INVALID), ("resize", {}, cp.INVALID),
             ("merge", {"layer": 5}, cp.INVALID), ("checkpoint", {"name": "x", "colour": "red"}, cp.INVALID),
             ("status", {"image": "\u0000"}, cp.INVALID), ("checkpoint", {"name": "../escape"}, cp.FAILED),
             ("merge", {"layer": "nosuch"}, cp.FAILED), ("status", {"image": "nosuch"}, cp.FAILED),
             ("resize", {"size": 1000}, cp.FAILED)]
    for i, (command, arguments, error_class) in enumerate(cases):
        client.send(cp.request(command, arguments, i))
        message = client.answer()
        assert (message.kind, message.id, message.value["class"]) == ("error", i, error_class), message
    assert not (image.parent.parent / "escape.avhdx").exists()


def test_a_line_too_long_ends_only_that_connection(daemon, client):
    client.send(b"{\"execute\": \"" + b"a" * (cp.MAX_LINE + 10))
    message = client.message()
    assert message.kind == "error" and "longer than" in message.value["desc"]
    assert client.closed_by_daemon()


def test_clients_that_vanish_mid_line_and_mid_request(daemon):
    path = control_of(daemon)
    for data in (b"", b"{\"execute\": \"sta", cp.request("status"), cp.request("checkpoints") * 50):
        c = Line(path)
        c.send(data)
        c.close()
    c = Line(path)  # and one that leaves before the greeting is read
    c.close()


def test_many_clients_at_once(daemon):
    path = control_of(daemon)
    clients = [Line(path) for _ in range(48)]
    kinds = [c.message().kind for c in clients]
    assert kinds.count("greeting") >= 32 - 1 and "error" in kinds  # at most 32 at a time; the rest are told
    for c in clients:
        c.close()
    for _ in range(200):  # the daemon notices the closed ones as it reads them
        if Line(path).message().kind == "greeting":
            break
        time.sleep(0.05)
    else:
        pytest.fail("the daemon did not take clients again")


def test_a_client_that_never_reads_its_replies_holds_up_no_one(daemon):
    flood = Line(control_of(daemon))
    flood.sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        for _ in range(20000):
            flood.sock.send(cp.request("status"))
    good_clients(daemon)  # answered while the flood waits for its reader
    flood.close()


def test_pipelined_requests_are_answered_in_order(client):
    client.send(b"".join(cp.request("checkpoints", rid=i) for i in range(300)))
    assert [client.answer().id for _ in range(300)] == list(range(300))


def test_a_merge_whose_client_vanishes_finishes_in_the_daemon(daemon, image):
    io = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x31 0 8M", daemon.uri()], capture_output=True)
    assert io.returncode == 0
    top = Path(vhdxfs("checkpoint", daemon.socket).stdout.strip())
    io = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x32 0 40M", daemon.uri()], capture_output=True)
    assert io.returncode == 0
    c = Line(control_of(daemon))
    assert c.message().kind == "greeting"
    c.send(cp.request("merge", {"layer": top.name}, 1))
    c.close()  # gone before the merge has even started, or while it copies
    other = Line(control_of(daemon))  # a second client meanwhile: refused (one operation at a time) or fine
    other.message()
    other.send(cp.request("checkpoint", {"name": "during"}, 2))
    answer = other.answer()
    if answer.kind == "error":
        assert "is running" in answer.value["desc"] and answer.value["reason"] == "locked"
    other.close()
    for _ in range(600):
        status = json.loads(vhdxfs("status", daemon.socket, "--json").stdout)
        if status["images"][0]["operation"] is None:
            break
        time.sleep(0.1)
    chain = [layer["path"] for layer in status["images"][0]["chain"]]
    assert str(top) not in chain and not top.exists()
    io = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x32 0 40M", "-c", "read -P 0 40M 8M", daemon.uri()],
                        capture_output=True, text=True)
    assert io.returncode == 0 and "fail" not in io.stdout.lower(), io.stdout
    if answer.kind == "return":  # the checkpoint went in before the merge ended: merge it too
        assert vhdxfs("merge", daemon.socket, "during").returncode == 0


def test_a_stop_mid_merge_leaves_a_chain_that_opens_with_every_byte(serve, tmp_path):
    """A merge big enough to be cut short most of the time (then undone); if it was quicker, done."""
    image = make_image(tmp_path / "big.vhdx", 512 * MiB, block_size=MiB)
    with serve(image) as server:
        io = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x41 0 8M", server.uri()], capture_output=True)
        assert io.returncode == 0
        top = Path(vhdxfs("checkpoint", server.socket).stdout.strip())
        io = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 4M 300M", server.uri()], capture_output=True)
        assert io.returncode == 0
        c = Line(control_of(server))
        assert c.message().kind == "greeting"
        c.send(cp.request("merge", {"layer": top.name}, 1))
        stopped = vhdxfs("stop", server.socket)  # at once: the merge is cut short and undone, or done
        assert stopped.returncode == 0, stopped.stderr
        c.close()
    for layer in (top, image):
        if layer.exists():
            report = check_image(layer)
            assert report["status"] == "clean" and not report["errors"], report
    with serve(image) as server:  # whatever the stop left, disk.vhdx opens the chain with every byte
        io = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x41 0 4M", "-c", "read -P 0x42 4M 300M",
                             "-c", "read -P 0 304M 208M", server.uri()], capture_output=True, text=True)
        assert io.returncode == 0 and "fail" not in io.stdout.lower(), io.stdout + io.stderr
