"""The invariants every fuzz target checks on every input, in one place.

- Only the documented errors escape: ``refused`` swallows vhdxfs.errors.VhdxError (after checking that it
  says something and carries an errno) and lets anything else through, which the fuzzer reports as a crash.
- A read-only path never writes: ``ReadOnlyMemory`` is the image for read-only opens, and any write, size
  change or hole punch raises ``WroteReadOnly`` (an AssertionError, so no ``except VhdxError`` hides it).
- Bounded time and memory per input: under atheris, ``cpu_limit`` (10 s of CPU time) and ``-rss_limit_mb``
  (tests/fuzz/run.py); when the corpora are replayed, ``bounded`` (SIGALRM and tracemalloc). CPU time, not
  libFuzzer's wall-clock ``-timeout``, because a long run may be stopped (SIGSTOP) for minutes while
  benchmarks run, and then every input in flight would look like a hang.
"""

from __future__ import annotations

import signal
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vhdxfs.engine import MemoryFile
from vhdxfs.errors import ParentError, VhdxError

TIME_LIMIT = 10  # seconds per input
MEMORY_LIMIT = 256 << 20  # bytes allocated at peak per input (replay)


class WroteReadOnly(AssertionError):
    """A read-only open changed the file."""


class Hang(AssertionError):
    """An input took longer than TIME_LIMIT."""


class ReadOnlyMemory(MemoryFile):
    """An image in memory that fails loudly on anything that would change it."""

    def __init__(self, data: bytes | bytearray, path: object) -> None:
        self.path = Path(str(path))
        self.writable = False
        self.data = data  # shared, not copied: nothing here may change it (a copy of MiBs per open is slow)

    def _refuse(self, *args: object) -> bool:
        raise WroteReadOnly(f"read-only open of {self.path} tried to change it ({args[:2]})")

    pwrite = truncate = punch_hole = allocate = write_zeros = _refuse  # type: ignore[assignment]


def memory_factory(images: dict[Path, bytes]) -> Callable[..., MemoryFile]:
    """A host factory serving ``images`` read-only from memory; any other path (a parent locator may name
    any file) is refused as a missing parent, so a fuzz input never opens the host's own files."""

    def factory(path: object, *, writable: bool) -> MemoryFile:
        data = images.get(Path(str(path)).resolve())
        if data is None:
            raise ParentError("not one of the fuzzer's images", path=path)
        if writable:
            raise WroteReadOnly(f"{path} was opened for writing on a read-only path")
        return ReadOnlyMemory(data, path)

    return factory


@contextmanager
def refused() -> Iterator[list[VhdxError]]:
    """Swallow a VhdxError (recorded in the list yielded) and nothing else."""
    errors: list[VhdxError] = []
    try:
        yield errors
    except VhdxError as exc:
        assert str(exc) and isinstance(exc.errno, int) and exc.errno > 0, repr(exc)
        errors.append(exc)


@contextmanager
def cpu_limit(seconds: int = TIME_LIMIT) -> Iterator[None]:
    """Fail an input that uses more than ``seconds`` of CPU time (ITIMER_PROF: time stopped is not counted)."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"more than {seconds} s of CPU time")

    previous = signal.signal(signal.SIGPROF, on_alarm)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


@contextmanager
def bounded(seconds: int = TIME_LIMIT, memory: int = MEMORY_LIMIT) -> Iterator[None]:
    """Fail an input that runs longer than ``seconds`` or allocates more than ``memory`` at peak."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    tracemalloc.start()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < memory, f"{peak} bytes allocated at peak"
