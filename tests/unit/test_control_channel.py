"""The control channel in a daemon's life (vhdxfs/service/control.py through service/lifecycle.py), with a
stand-in front end whose commands the test steers: the socket exists exactly while the daemon serves, mode
0600; the pid record names it and what the daemon holds, and is written again after a changing command; a
command runs on when its client vanishes; a stop cancels what runs and waits for it before the images
close; failures and bugs cost a request, never the daemon."""

from __future__ import annotations

import functools
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from vhdxfs.errors import Reason, VhdxError
from vhdxfs.service import control
from vhdxfs.service import control_protocol as cp
from vhdxfs.service.control import Command, control_path
from vhdxfs.service.control_client import ControlClient
from vhdxfs.service.lifecycle import Life, Serving, run_daemon
from vhdxfs.service.records import read_holder


class Daemon:
    """A front end with steerable commands: ``slow`` waits for ``release``; ``layers`` is what it holds."""

    def __init__(self, tmp_path: Path) -> None:
        self.record = tmp_path / "d.pid"
        self.key = "test:control"
        self.control = control_path(self.record, self.key)
        self.events: list[str] = []
        self.layers = ["/srv/disk.vhdx"]
        self.release = trio.Event()
        self.started = trio.Event()
        self.life: Life | None = None
        self.ready = trio.Event()

    async def start(self, life: Life) -> Serving:
        self.life = life
        life.on_close(self._close_disks)

        async def slow(args: dict[str, Any], emit: control.Emit) -> dict[str, Any]:
            self.started.set()
            emit("progress", {"done-bytes": 1})
            try:
                await self.release.wait()
            except trio.Cancelled:
                with trio.CancelScope(shield=True):
                    await trio.sleep(0.01)  # undoing takes a moment
                    self.events.append("slow undone")
                raise
            self.layers.append(f"/srv/layer{len(self.layers)}.avhdx")
            self.events.append("slow done")
            return {"layers": len(self.layers)}

        async def fail(args: dict[str, Any], emit: control.Emit) -> None:
            raise VhdxError("cannot do that now", path="/srv/disk.vhdx", errno=16, reason=Reason.LOCKED)

        async def bug(args: dict[str, Any], emit: control.Emit) -> None:
            raise ZeroDivisionError("oops")

        async def echo(args: dict[str, Any], emit: control.Emit) -> dict[str, Any]:
            return args

        commands = {"slow": Command({}, slow, changes=True), "fail": Command({}, fail), "bug": Command({}, bug),
                    "echo": Command({"text": cp.Param("string", True)}, echo)}
        return Serving(self.record, self.key, "serving", "serving", self.serve, kind="mount", commands=commands,
                       held=lambda: [{"name": "disk.raw", "image": "/srv/disk.vhdx", "layers": list(self.layers)}])

    async def _close_disks(self) -> None:
        self.events.append("disks closed")

    async def serve(self) -> None:
        assert self.life is not None
        self.ready.set()
        await self.life.stopping.wait()

    async def run(self, body) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(run_daemon, lambda error: None, self.start, stop_message="stop"))
            await self.ready.wait()
            try:
                with trio.fail_after(60):  # a hang fails the test instead of the run
                    await body()
            finally:
                assert self.life is not None
                self.life.stop("test")


async def in_thread(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


def call(path: Path, command: str, arguments: dict[str, Any] | None = None) -> Any:
    with ControlClient(path) as client:
        return client.call(command, arguments)


async def test_the_socket_exists_while_the_daemon_serves_and_the_record_names_it(tmp_path):
    d = Daemon(tmp_path)

    async def body() -> None:
        mode = os.stat(d.control).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        holder = read_holder(d.record)
        assert holder is not None and holder.control == d.control and holder.kind == "mount"
        assert holder.holds("/srv/disk.vhdx") is not None and holder.holds("/srv/other.vhdx") is None
        client = await in_thread(ControlClient, d.control)
        with client:
            assert client.greeting["pid"] == os.getpid() and client.greeting["kind"] == "mount"
            assert client.greeting["key"] == d.key and "slow" in client.greeting["commands"]
            assert await in_thread(client.call, "echo", {"text": "hi"}) == {"text": "hi"}

    await d.run(body)
    assert not d.control.exists() and not d.record.exists()


async def test_a_changing_command_rewrites_the_record(tmp_path):
    d = Daemon(tmp_path)
    d.release.set()

    async def body() -> None:
        assert await in_thread(call, d.control, "slow") == {"layers": 2}
        holder = read_holder(d.record)
        assert holder is not None and holder.holds("/srv/layer1.avhdx") is not None

    await d.run(body)


async def test_a_command_runs_on_when_its_client_vanishes(tmp_path):
    d = Daemon(tmp_path)

    async def body() -> None:
        def start_and_vanish() -> None:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(d.control))
                assert b"\n" in s.recv(65536)  # the greeting
                s.sendall(cp.request("slow", rid=1))
        await in_thread(start_and_vanish)
        await d.started.wait()
        d.release.set()
        while "slow done" not in d.events:
            await trio.sleep(0.01)
        holder = read_holder(d.record)
        assert holder is not None and holder.holds("/srv/layer1.avhdx") is not None
        assert await in_thread(call, d.control, "echo", {"text": "still here"}) == {"text": "still here"}

    await d.run(body)
    assert d.events == ["slow done", "disks closed"]


async def test_a_stop_undoes_what_runs_before_the_images_close(tmp_path):
    d = Daemon(tmp_path)
    answers: list[Any] = []

    def caller() -> None:
        try:
            call(d.control, "slow")
        except VhdxError as exc:
            answers.append(exc)

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_thread, caller)
            await d.started.wait()
            assert d.life is not None
            d.life.stop("test")

    await d.run(body)
    assert d.events == ["slow undone", "disks closed"]
    assert len(answers) == 1  # told the command was interrupted, or that the daemon went away
    assert answers[0].reason in (Reason.INTERRUPTED, Reason.HOST_IO)


async def test_failures_and_bugs_are_answered_and_the_daemon_goes_on(tmp_path):
    d = Daemon(tmp_path)

    async def body() -> None:
        with pytest.raises(VhdxError) as failed:
            await in_thread(call, d.control, "fail")
        assert str(failed.value) == "/srv/disk.vhdx: cannot do that now" and failed.value.reason == Reason.LOCKED
        with pytest.raises(VhdxError) as bug:
            await in_thread(call, d.control, "bug")
        assert bug.value.reason == Reason.INTERNAL and "ZeroDivisionError" in str(bug.value)
        with pytest.raises(VhdxError) as unknown:
            await in_thread(call, d.control, "frobnicate")
        assert "no command 'frobnicate'" in str(unknown.value) and "echo" in str(unknown.value)
        with pytest.raises(VhdxError) as typed:
            await in_thread(call, d.control, "echo", {"text": 5})
        assert "text must be a string" in str(typed.value)
        assert await in_thread(call, d.control, "echo", {"text": "ok"}) == {"text": "ok"}

    await d.run(body)


async def test_too_many_clients_are_told_so_and_the_others_served(tmp_path, monkeypatch):
    monkeypatch.setattr(control, "MAX_CLIENTS", 4)
    d = Daemon(tmp_path)

    async def body() -> None:
        held = [await in_thread(ControlClient, d.control) for _ in range(4)]
        with pytest.raises(VhdxError) as refused:
            await in_thread(ControlClient, d.control)
        assert "too many clients" in str(refused.value)
        for client in held:
            client.close()
        while True:  # the daemon notices the closed ones as it reads them
            try:
                client = await in_thread(ControlClient, d.control)
                break
            except VhdxError:
                await trio.sleep(0.01)
        with client:
            assert await in_thread(client.call, "echo", {"text": "in"}) == {"text": "in"}

    await d.run(body)
