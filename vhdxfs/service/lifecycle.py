"""One life for every vhdxfs daemon (the FUSE mount, the NBD server): start, ready, serve, stop, close.

Why one: the mount and the server must end the same way whatever ends them (a stop signal, an unmount
from outside, a failure at start-up, an error while serving): what was opened is closed, in reverse
order, and the images are clean before the daemon is gone. Written twice, each new way out had to be
handled twice; here it is handled once.

The life is an AsyncExitStack, as s3ql keeps its mount's: each resource is entered on it with its
clean-up the moment it exists, so every way out closes exactly what was opened, last opened first.
Clean-ups that wait (closing the images) run shielded from cancellation (``Life.on_close``), so a close
is never cut short. Workers run in nurseries: the daemon's own (``Life.nursery``, around the stack: the
signal watcher, and daemon-wide services) and any the front end enters on the stack (the NBD server's
connections, which must finish before the images they use close). A nursery is entered unshielded (trio
wants a cancel scope left where it was entered); its tasks end when ``Life.stopping`` is set.

The stack, first entered (closed last) to last entered (closed first):

1. the pid record (service/records.py): written once the daemon serves, so `vhdxfs umount` and
   `vhdxfs stop` find only a daemon that serves; removed last, after the images are closed, so a command
   that waits for the daemon's exit never finds the record gone while the images are still closing;
2. the front end's resources, entered by its ``start(life)`` in the order it opens them, which returns
   what it serves (``Serving``): the mount enters the disks, then the FUSE session; the NBD server the
   listening sockets, the disks, the connections' nursery, then the accept loops;
3. the notify state: READY=1 once ready (after the record, so a stop finds the daemon), STOPPING=1 first
   thing at the close.

Then ``Serving.serve()`` runs until it returns (the kernel ended the FUSE session) or the first stop
signal calls ``Life.stop``, which calls ``Serving.interrupt``. A ``VhdxError`` before the daemon is ready
is its failure to start: the stack closes what was opened, then the starter gets the error (``Ready``).

A new piece is one more entry. The control channel (service/control.py: a unix socket beside the pid
record, through which `vhdxfs status`, `checkpoint`, `merge` and `resize` reach the running disks) is the
one entered between 2 and 3:

2b. the control channel, serving the front end's ``Serving.commands``: it exists exactly while the daemon
   serves (failing to bind it fails the start like any failure), and closes before the rest: no new
   request, the command running cancelled (a live operation finishes or undoes itself) and waited for,
   then the resources it talks about close.

The record says what the daemon holds (``Serving.held``: each image's chain, service/records.py) and is
written again after each command that changes it (``Life.refresh_record``).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import trio

from ..errors import Reason, VhdxError
from .control import Command, control_channel, control_path
from .daemon import Ready
from .notify import sd_notify
from .records import remove_record, write_record
from .signals import watch_stop_signals

log = logging.getLogger("vhdxfs")
P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Serving:
    """What a started front end serves, as its ``start`` returns it to the lifecycle."""

    record: Path  # its pid record (service/records.py)
    key: str  # what the record calls it: the mount point, the listen address
    status: str  # systemd's STATUS= line
    announce: str  # the log line that says it serves
    serve: Callable[[], Awaitable[None]]  # serve until stopped, or until serving ends of itself
    interrupt: Callable[[], None] | None = None  # called by a stop while ``serve`` runs (pyfuse3.terminate)
    kind: str = "daemon"  # mount | nbd: what `vhdxfs status` and the messages naming a holder call it
    commands: Mapping[str, Command] = field(default_factory=dict)  # the control channel's (service/control.py)
    held: Callable[[], list[dict[str, Any]]] | None = None  # the images and their layers, for the pid record


class Life:
    """A daemon's life as its front end sees it: where to enter what it opens, and whether to stop."""

    def __init__(self, nursery: trio.Nursery, stop_message: str) -> None:
        self.nursery = nursery  # the daemon's nursery: daemon-wide tasks, cancelled after the close
        self.stopping = trio.Event()  # set by the first stop, and when serving ends of itself
        self.stopped_by: str | None = None  # what stopped the daemon (a signal's name)
        self.announced = False  # the starter was told the daemon serves
        self._stop_message = stop_message
        self._stack = AsyncExitStack()
        self._interrupt: Callable[[], None] | None = None
        self.started = time.time()
        self.serving: Serving | None = None
        self.control: Path | None = None  # the control socket, once bound
        self._record = _Record()

    def stop(self, why: str) -> None:
        """Start a clean stop: ``stopping`` is set and a running ``serve`` is interrupted. The first stop
        signal calls this; later calls change nothing."""
        if self.stopped_by is not None:
            return
        self.stopped_by = why
        log.info("%s: %s", why, self._stop_message)
        self.stopping.set()
        if self._interrupt is not None:
            self._interrupt()

    def refuse_if_stopping(self, what: str) -> None:
        """Fail the start when a stop came while it ran (``what``: "while opening the images; not mounted")."""
        if self.stopped_by is not None:
            raise VhdxError(f"{self.stopped_by} {what}", errno=errno.EINTR, reason=Reason.INTERRUPTED)

    async def enter(self, manager: AbstractAsyncContextManager[T]) -> T:
        """Enter ``manager`` (a nursery, a piece such as a control channel); it exits at the close in
        reverse order. Not shielded: a manager that awaits in its exit shields that itself."""
        return await self._stack.enter_async_context(manager)

    def callback(self, fn: Callable[P, object], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """At the close, in reverse order: ``fn(*args, **kwargs)`` (a clean-up that does not wait)."""
        self._stack.callback(fn, *args, **kwargs)

    def on_close(self, fn: Callable[P, Awaitable[object]], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """At the close, in reverse order: ``await fn(*args, **kwargs)``, shielded from cancellation, so
        closing the images finishes whatever ends the daemon."""
        async def shielded() -> None:
            with trio.CancelScope(shield=True):
                await fn(*args, **kwargs)

        self._stack.push_async_callback(shielded)

    def hello(self) -> dict[str, Any]:
        """Who the daemon is: the control channel's greeting, the daemon part of `vhdxfs status`."""
        serving = self.serving
        return {"version": _version(), "pid": os.getpid(), "kind": serving.kind if serving else "daemon",
                "key": serving.key if serving else None, "started": self.started,
                "uptime-seconds": round(time.time() - self.started, 3),
                "commands": sorted(serving.commands) if serving else []}

    def holds(self) -> dict[str, Any]:
        """The record's fourth line: kind, control socket, images and their layers (service/records.py)."""
        serving = self.serving
        images = serving.held() if serving is not None and serving.held is not None else []
        return {"kind": serving.kind if serving else "daemon", "control": str(self.control) if self.control else None,
                "images": images}

    def refresh_record(self) -> None:
        """Write the pid record again (after a live operation changed the chains); only once it was written."""
        if self._record.written is not None:
            self._record.write(*self._record.written, self.holds())

    async def _live(self, ready: Ready, start: Start) -> None:
        """The stack, entered in the order the module's docstring lists."""
        async with self._stack:
            record = self._record
            self.callback(record.remove)
            serving = self.serving = await start(self)
            self.control = await self.enter(control_channel(
                self.nursery, self.stopping, control_path(serving.record, serving.key), self.hello,
                serving.commands, self.refresh_record))
            record.write(serving.record, serving.key, self.holds())
            log.info("%s", serving.announce)
            ready(None)
            self.announced = True
            sd_notify("READY=1\nSTATUS=" + serving.status)
            self.callback(sd_notify, "STOPPING=1")
            await self._serve(serving)

    async def _serve(self, serving: Serving) -> None:
        if self.stopping.is_set():
            return
        self._interrupt = serving.interrupt
        try:
            await serving.serve()
        finally:
            self._interrupt = None
            self.stopping.set()  # whatever ended serving: the workers finish too


Start = Callable[[Life], Awaitable[Serving]]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("vhdxfs")
    except Exception:  # noqa: BLE001 - not installed (run from a source tree)
        return "unknown"


class _Record:
    """The daemon's pid record once written; at the close removed if it is still this daemon's."""

    def __init__(self) -> None:
        self.written: tuple[Path, str] | None = None

    def write(self, path: Path, key: str, holds: dict[str, Any] | None = None) -> None:
        try:
            write_record(path, key, holds)
        except OSError as exc:
            log.warning("cannot record the daemon pid in %s: %s", path, exc)
            return
        self.written = (path, key)

    def remove(self) -> None:
        if self.written is not None:
            remove_record(*self.written)


async def run_daemon(ready: Ready, start: Start, *, stop_message: str) -> None:
    """Live one daemon's life: ``start(life)`` opens and enters what it serves, the daemon is announced
    (pid record, ``ready(None)``, READY=1), serves until stopped, and closes everything. ``stop_message``
    is logged at the first stop signal: what the daemon does now."""
    async with trio.open_nursery() as nursery:
        life = Life(nursery, stop_message)
        await nursery.start(watch_stop_signals, life.stop)
        try:
            await life._live(ready, start)
        except* VhdxError as group:
            if life.announced:
                raise
            ready(_first(group))  # everything it opened is closed by now
        finally:
            nursery.cancel_scope.cancel()


def _first(group: BaseExceptionGroup[VhdxError]) -> VhdxError:
    """The first error of a group (a nursery wraps what fails inside it)."""
    first = group.exceptions[0]
    return first if isinstance(first, VhdxError) else _first(first)
