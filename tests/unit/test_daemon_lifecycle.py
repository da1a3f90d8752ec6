"""The one daemon lifecycle (vhdxfs/service/lifecycle.py) with a stand-in front end: what is entered is
closed in reverse order on every way out, the pid record comes before ready and goes last, clean-ups run
shielded, and a failure to start reaches the starter only after everything opened is closed.

The mount and the NBD server are tested through it with real daemons (test_lifecycle.py here and in
tests/nbd); these tests reach the ways out a real daemon rarely takes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from vhdxfs.errors import ImageLockedError, Reason, VhdxError
from vhdxfs.service.daemon import daemonize
from vhdxfs.service.lifecycle import Life, Serving, run_daemon
from vhdxfs.service.records import read_record


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A $NOTIFY_SOCKET to read what the daemon told systemd."""
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    yield sock
    sock.close()


def notified(sock: socket.socket) -> list[str]:
    out = []
    with contextlib.suppress(BlockingIOError):
        while True:
            out.append(sock.recv(4096).decode())
    return out


class Starter:
    """The starter's side of ``ready``: what it was told, and what had happened by then."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.told: list[VhdxError | None] = []

    def __call__(self, error: VhdxError | None) -> None:
        self.told.append(error)
        self.events.append("ready" if error is None else f"failed: {error}")


class FrontEnd:
    """Enters two resources (one closed by a plain callback, one shielded and awaiting), then serves."""

    def __init__(self, tmp_path: Path, events: list[str]) -> None:
        self.record = tmp_path / "daemon.pid"
        self.events = events
        self.life: Life | None = None
        self.record_when_disks_closed: bool | None = None

    async def close_disks(self) -> None:
        await trio.sleep(0)  # a checkpoint: it raises Cancelled here unless the close is shielded
        self.events.append("disks closed")
        self.record_when_disks_closed = self.record.exists()

    async def start(self, life: Life) -> Serving:
        self.life = life
        self.events.append("sockets opened")
        life.callback(self.events.append, "sockets closed")
        self.events.append("disks opened")
        life.on_close(self.close_disks)
        return Serving(record=self.record, key="test:key", status="serving test", announce="serving test",
                       serve=self.serve, interrupt=lambda: self.events.append("interrupted"))

    async def serve(self) -> None:
        assert self.life is not None
        self.events.append(f"serving, record {read_record(self.record, 'test:key') == os.getpid()}")
        os.kill(os.getpid(), signal.SIGTERM)
        await self.life.stopping.wait()
        self.events.append(f"stopped by {self.life.stopped_by}")


async def test_a_stop_signal_closes_everything_in_reverse_and_the_record_goes_last(tmp_path, notify):
    events: list[str] = []
    front = FrontEnd(tmp_path, events)
    starter = Starter(events)
    await run_daemon(starter, front.start, stop_message="closing")
    assert events == ["sockets opened", "disks opened", "ready", "serving, record True", "interrupted",
                      "stopped by SIGTERM", "disks closed", "sockets closed"]
    assert front.record_when_disks_closed  # removed only after the images are closed
    assert starter.told == [None]
    assert not front.record.exists()
    assert notified(notify) == ["READY=1\nSTATUS=serving test", "STOPPING=1"]


async def test_a_failure_at_start_closes_what_was_opened_before_the_starter_hears_of_it(tmp_path, notify):
    events: list[str] = []
    front = FrontEnd(tmp_path, events)
    starter = Starter(events)
    locked = ImageLockedError("held by another process", path="b.vhdx")

    async def start(life: Life) -> Serving:
        await front.start(life)
        raise locked

    await run_daemon(starter, start, stop_message="closing")
    assert events == ["sockets opened", "disks opened", "disks closed", "sockets closed",
                      "failed: b.vhdx: held by another process"]
    assert starter.told == [locked] and starter.told[0].reason == Reason.LOCKED  # the error itself, typed
    assert not front.record.exists()
    assert notified(notify) == []  # never READY, so never STOPPING either


async def test_a_failure_inside_a_nursery_entry_is_still_the_failure_to_start(tmp_path):
    events: list[str] = []
    starter = Starter(events)

    async def start(life: Life) -> Serving:
        workers = await life.enter(trio.open_nursery())
        workers.start_soon(trio.sleep_forever)  # cancelled as the failure passes the nursery
        life.callback(events.append, "workers gone")
        raise VhdxError("cannot listen", reason=Reason.HOST_IO)

    await run_daemon(starter, start, stop_message="closing")
    assert events == ["workers gone", "failed: cannot listen"]


async def test_a_stop_during_start_fails_the_start_when_the_front_end_says_so(tmp_path):
    events: list[str] = []
    starter = Starter(events)

    async def start(life: Life) -> Serving:
        life.callback(events.append, "disks closed")
        os.kill(os.getpid(), signal.SIGINT)
        await life.stopping.wait()  # opening the images takes a while; the signal comes meanwhile
        life.refuse_if_stopping("while opening the images; not mounted")
        raise AssertionError("not reached")

    await run_daemon(starter, start, stop_message="closing")
    assert events == ["disks closed", "failed: SIGINT while opening the images; not mounted"]
    assert starter.told[0] is not None and starter.told[0].errno == errno.EINTR


async def test_when_a_worker_fails_the_close_still_finishes_shielded(tmp_path):
    events: list[str] = []
    front = FrontEnd(tmp_path, events)

    async def crash() -> None:
        await trio.sleep(0)
        raise RuntimeError("a bug in a worker")

    async def start(life: Life) -> Serving:
        serving = await front.start(life)
        life.nursery.start_soon(crash)  # the daemon's nursery: its failure cancels the daemon's life

        async def serve() -> None:
            await trio.sleep_forever()

        return Serving(serving.record, serving.key, serving.status, serving.announce, serve)

    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="a bug"), flatten_subgroups=True):
        await run_daemon(Starter(events), start, stop_message="closing")
    assert events[-2:] == ["disks closed", "sockets closed"]  # cancelled, and the disks closed all the same
    assert not front.record.exists()


async def test_serving_that_ends_of_itself_stops_the_workers_and_closes(tmp_path):
    """The kernel ended the FUSE session (an unmount from outside): no signal, the same close."""
    events: list[str] = []
    front = FrontEnd(tmp_path, events)

    async def start(life: Life) -> Serving:
        serving = await front.start(life)

        async def worker() -> None:
            await life.stopping.wait()
            events.append("worker saw stopping")

        workers = await life.enter(trio.open_nursery())
        workers.start_soon(worker)

        async def serve() -> None:
            events.append("session ended")

        return Serving(serving.record, serving.key, serving.status, serving.announce, serve)

    await run_daemon(Starter(events), start, stop_message="closing")
    assert events[3:] == ["session ended", "worker saw stopping", "disks closed", "sockets closed"]


async def test_a_record_another_daemon_wrote_since_is_left_alone(tmp_path):
    """A lazily unmounted daemon exits after a new one mounted on the same directory: the record is theirs."""
    events: list[str] = []
    front = FrontEnd(tmp_path, events)
    parent = os.getppid()

    async def start(life: Life) -> Serving:
        serving = await front.start(life)

        async def serve() -> None:
            with open(front.record, "w") as f:  # the new daemon's record (any live process will do)
                f.write(f"{parent}\ntest:key\n{_start_time(parent)}\n")

        return Serving(serving.record, serving.key, serving.status, serving.announce, serve)

    await run_daemon(Starter(events), start, stop_message="closing")
    assert read_record(front.record, "test:key") == parent


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(") ", 1)[1].split()[19]


@contextlib.asynccontextmanager
async def _piece(events: list[str]) -> AsyncIterator[None]:
    events.append("piece entered")
    try:
        yield
    finally:
        events.append("piece closed")


async def test_a_piece_entered_after_the_resources_closes_before_them(tmp_path):
    """How a control channel sits in the stack: one more entry, closed before what it talks about."""
    events: list[str] = []
    front = FrontEnd(tmp_path, events)

    async def start(life: Life) -> Serving:
        serving = await front.start(life)
        await life.enter(_piece(events))
        return serving

    await run_daemon(Starter(events), start, stop_message="closing")
    assert events.index("disks opened") < events.index("piece entered") < events.index("ready")
    assert events.index("piece closed") < events.index("disks closed")


def test_the_error_that_kept_a_daemon_from_starting_reaches_its_starter_whole(tmp_path):
    """Across the readiness pipe: the message, and the errno and reason code may tell failures apart by."""

    def service(ready):
        ready(ImageLockedError("held by another process", path="a.vhdx"))

    with pytest.raises(VhdxError) as caught:
        daemonize(service, what="test", debug=False, log_file=tmp_path / "test.log")
    assert str(caught.value) == "a.vhdx: held by another process"
    assert (caught.value.reason, caught.value.errno) == (Reason.LOCKED, errno.EBUSY)
