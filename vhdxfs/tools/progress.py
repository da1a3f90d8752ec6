"""The CLI's one progress bar (tqdm): shown on a terminal, silent otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from tqdm import tqdm


class Bar(Protocol):
    """What a progress bar offers (the engine's ProgressBar): the bytes dealt with since the last call."""

    def update(self, n: int) -> object: ...


@contextmanager
def progress(total: int, description: str) -> Iterator[Bar]:
    """A byte-counting bar on stderr when it is a terminal; a no-op otherwise."""
    bar = tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
               disable=not sys.stderr.isatty(), leave=False, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()
