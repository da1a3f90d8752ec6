"""Shared by the unit tests that run a daemon's lifecycle in the test process."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from vhdxfs.service.signals import STOP_SIGNALS


@pytest.fixture(autouse=True)
def signal_handlers() -> Iterator[None]:
    """A daemon ignores stop signals once its life is over; the test process must not."""
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
