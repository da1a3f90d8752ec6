"""Progress reporting for long image operations (compact, commit), without a user interface in the engine.

The engine must not draw anything: the CLI shows a tqdm bar, a library caller may want a log line or
nothing. So a long operation takes a ``progress`` callable ``(total, description) -> context manager``
whose value has ``update(n)``, and calls ``update`` with the bytes it has dealt with. The default,
``no_progress``, does nothing; vhdxfs/tools/progress.py's ``progress`` fits the same shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol


class ProgressBar(Protocol):
    def update(self, n: int) -> object: ...


# (total bytes, description) -> a context manager giving a ProgressBar.
Progress = Callable[[int, str], AbstractContextManager[ProgressBar]]


class _Silent:
    def update(self, n: int) -> None:
        return None


@contextmanager
def no_progress(total: int, description: str) -> Iterator[ProgressBar]:
    """Report nothing."""
    yield _Silent()
