"""Stopping a daemon by signal, the same way for the mount and the NBD server.

SIGTERM, SIGINT and SIGHUP are received for the daemon's whole life: the first calls ``stop(name)``, which
starts a clean stop; later ones are noted and ignored, since the close must finish for the images to be
clean. Once the service is done, late signals are ignored too, so they cannot turn a clean exit into a
kill.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("vhdxfs")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def run_until_stopped(service: Callable[[], Awaitable[None]], stop: Callable[[str], None]) -> None:
    """Run ``service()``; the first stop signal meanwhile calls ``stop(signal name)``."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch, signals, stop)
            try:
                await service()
            finally:
                nursery.cancel_scope.cancel()
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


async def _watch(signals, stop: Callable[[str], None]) -> None:
    stopping = False
    async for signum in signals:
        name = signal.Signals(signum).name
        if not stopping:
            stopping = True
            stop(name)
        else:
            log.warning("%s: already stopping; waiting for the images to close cleanly", name)
