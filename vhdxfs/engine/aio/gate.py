"""The gate of a running disk: requests come in freely, until a live operation closes it to change the chain.

Why: a checkpoint, the switch at the end of a merge and a resize change which files a request reaches.
They close the gate: new requests wait at it, the ones inside finish (their plans' guards let go of their
blocks), and only then does the operation change the chain; it opens the gate again when it is done. A
request never sees half a change, and none fails because of one.

Cost on the request path: one attribute test, and a count in and out.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from time import perf_counter_ns

import trio

from .stats import KindStats


class Gate:
    """Counts the requests inside; ``closed()`` holds new ones at the door and waits for the inside to empty."""

    __slots__ = ("inside", "shut", "_reopened", "_emptied")

    def __init__(self) -> None:
        self.inside = 0
        self.shut = False  # tested on every request: new ones wait in ``enter`` while it is set
        self._reopened = trio.Event()
        self._emptied: trio.Event | None = None

    async def enter(self) -> None:
        """Wait until the gate is open; the caller is inside until it calls ``leave``."""
        while self.shut:
            await self._reopened.wait()
        self.inside += 1

    def leave(self) -> None:
        self.inside -= 1
        if self._emptied is not None and self.inside == 0:
            self._emptied.set()

    @contextlib.asynccontextmanager
    async def closed(self) -> AsyncIterator[None]:
        """Close the gate and wait until no request is inside; open it again on the way out. Not reentrant:
        the live operations hold a lock of their own around it."""
        assert not self.shut, "the gate is closed already"
        self.shut = True
        try:
            if self.inside:
                self._emptied = trio.Event()
                await self._emptied.wait()
            yield
        finally:
            self._emptied = None
            self.shut = False
            self._reopened.set()
            self._reopened = trio.Event()

    @contextlib.asynccontextmanager
    async def counted(self, kind: KindStats, nbytes: int) -> AsyncIterator[None]:
        """Through the gate, counted as ``kind`` (stats.py): for the requests off the hot path (flush, write
        zeroes), which need no written-out fast form."""
        await self.enter()
        started = perf_counter_ns()
        try:
            yield
        except BaseException:
            kind.failures += 1
            raise
        finally:
            self.leave()
        kind.add(nbytes, perf_counter_ns() - started)
