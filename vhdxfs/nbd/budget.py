"""The memory bound of the transmission phase: the data of READs and WRITEs in flight counts against a
budget, per connection and for the whole server (transmission.py says why)."""

from __future__ import annotations

import trio

BUDGET = 64 << 20  # data bytes of one connection's requests in flight
SERVER_BUDGET = 160 << 20  # ... and of every connection together (Exports.budget)


class ByteBudget:
    """At most ``limit`` bytes taken at once; a request larger than the limit runs alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed: trio.Event | None = None  # made only while someone waits

    def take(self, n: int) -> bool:
        """Take ``n`` if that needs no wait (the common case: no trip through the scheduler)."""
        if self.used and self.used + n > self.limit:
            return False
        self.used += n
        return True

    async def acquire(self, n: int) -> None:
        while self.used and self.used + n > self.limit:
            if self._freed is None:
                self._freed = trio.Event()
            await self._freed.wait()
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        if self._freed is not None:
            self._freed.set()
            self._freed = None
