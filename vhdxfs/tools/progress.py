"""The CLI's one progress bar (tqdm): shown on a terminal, silent otherwise."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def progress(total: int, description: str):
    """A byte-counting bar on stderr when it is a terminal; a no-op otherwise."""
    bar = tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
               disable=not sys.stderr.isatty(), leave=False, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()
