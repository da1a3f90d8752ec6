"""Stopping a daemon by signal, the same way for the mount and the NBD server.

SIGTERM, SIGINT and SIGHUP are received for the daemon's whole life (service/lifecycle.py runs the
watcher before it opens anything and ends it after everything is closed): the first calls
``stop(name)``, which starts a clean stop; later ones are noted and ignored, since the close must finish
for the images to be clean. Once the watcher ends, late signals are ignored too, so they cannot turn a
clean exit into a kill.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Callable

import trio

log = logging.getLogger("vhdxfs")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def watch_stop_signals(stop: Callable[[str], None], *,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Until cancelled, the first stop signal calls ``stop(signal name)``. Started with ``nursery.start``,
    so the signals are caught from the moment the start returns."""
    try:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            task_status.started()
            await _watch(signals, stop)
    finally:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


async def _watch(signals: AsyncIterator[int], stop: Callable[[str], None]) -> None:
    stopping = False
    async for signum in signals:
        name = signal.Signals(signum).name
        if not stopping:
            stopping = True
            stop(name)
        else:
            log.warning("%s: already stopping; waiting for the images to close cleanly", name)
