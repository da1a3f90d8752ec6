"""The data mover of the offline tools: a reader thread and a writer, I/O overlapped with the work.

One thread (``_ReadAhead``) reads the source's pieces (sources.py) into a few large buffers and finds their
zero pieces (zeroscan.py); the calling thread writes the runs of data and hands each buffer back. pread and
pwrite let go of the GIL while the kernel copies, so on two cores the reads, the writes and the scan run at
the same time, where a single loop did them one after the other. Buffers are reused: the copy allocates
nothing per chunk. They are 1 MiB: large enough that a syscall's cost vanishes, small enough that a buffer
is still in the CPU's cache when the scan and the write read what the kernel copied in (4 MiB buffers cost
30-90% more CPU time for the same conversion on the 2-vCPU machine of docs/performance.md; 256 KiB to
1 MiB were alike).

Writes keep the order of the pieces, in the calling thread, so what a target sees (its allocation order,
the operations a power-cut test counts) is the same as with one loop. ``writeback`` (hostfile.py) is
called every WRITEBACK_STEP bytes written: the target's disk starts writing while the copy goes on.

A failure on either side stops both: the reader's error is raised in the caller, and a failure of the
writer (or Ctrl-C) stops the reader, which is joined before ``move`` returns. Nothing of the source or the
target is used by the reader thread after that.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ...format.constants import MiB
from ..disk.runs import Kind
from .progress import ProgressBar
from .sources import Piece
from .zeroscan import data_runs

CHUNK = 1 * MiB  # the pieces' and buffers' size: large, aligned I/O whose buffers stay in the CPU's cache
DEPTH = 8  # buffers in flight: read ahead of the writer by up to 8 MiB
WRITEBACK_STEP = 64 * MiB

Write = Callable[[int, memoryview], object]
_DONE = object()


@dataclass
class Moved:
    """What a move did: bytes of data written, bytes of ZERO pieces passed on, bytes of zeros skipped."""

    written: int = 0
    zeroed: int = 0
    skipped: int = 0


class _ReadAhead:
    """The reader thread: pieces read into free buffers, with their runs of data, onto the ``ready`` queue."""

    def __init__(self, pieces: Iterable[Piece], chunk: int, sparse: int) -> None:
        self.pieces = pieces
        self.sparse = sparse
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(DEPTH):
            self.free.put(bytearray(chunk))
        self.ready: queue.Queue[Any] = queue.Queue(maxsize=4 * DEPTH)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vhdxfs-read-ahead", daemon=True)

    def _run(self) -> None:
        try:
            for piece in self.pieces:
                if self.stopping.is_set():
                    break
                if piece.kind != Kind.DATA:
                    self.ready.put((piece, None, ()))
                    continue
                assert piece.read is not None, "a DATA piece says how to read it"
                buf = self.free.get()
                if self.stopping.is_set():
                    break
                view = memoryview(buf)[:piece.length]
                piece.read(piece.at, view)
                self.ready.put((piece, buf, data_runs(view, piece.offset, self.sparse)))
        except BaseException as exc:  # handed to the writer, which raises it
            self.ready.put(exc)
        else:
            self.ready.put(_DONE)

    def stop(self) -> None:
        """Stop the reader and wait for it (its buffers are dropped)."""
        self.stopping.set()
        self.free.put(bytearray(0))  # a reader waiting for a buffer wakes up, and sees ``stopping``
        while self.thread.is_alive():
            try:
                item = self.ready.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, tuple) and item[1] is not None:
                self.free.put(item[1])
            if item is _DONE or isinstance(item, BaseException):
                break
        self.thread.join()


def move(pieces: Iterable[Piece], write: Write, *, total: int, bar: ProgressBar, sparse: int = 0,
         chunk: int = CHUNK, zero: Callable[[int, int], object] | None = None,
         writeback: Callable[[], object] | None = None) -> Moved:
    """Copy ``pieces`` (in order, none longer than ``chunk`` nor crossing a multiple of it): each DATA
    piece's runs of data (zeroscan.data_runs with ``sparse``) through ``write(offset, view)``, each ZERO
    piece through ``zero(offset, length)``. ``bar`` advances to ``total`` (the disk's size: what lies
    between pieces counts as done when the next piece is)."""
    reader = _ReadAhead(pieces, chunk, sparse)
    moved = Moved()
    done = since_writeback = 0
    reader.thread.start()
    try:
        while (item := reader.ready.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            piece, buf, runs = item
            if buf is None:
                assert zero is not None, "a source with ZERO pieces needs a target that takes them"
                zero(piece.offset, piece.length)
                moved.zeroed += piece.length
            else:
                view = memoryview(buf)
                for start, end in runs:
                    write(piece.offset + start, view[start:end])
                    since_writeback += end - start
                n = sum(end - start for start, end in runs)
                moved.written += n
                moved.skipped += piece.length - n
                reader.free.put(buf)
                if writeback is not None and since_writeback >= WRITEBACK_STEP:
                    writeback()
                    since_writeback = 0
            end = piece.offset + piece.length
            if end > done:
                bar.update(end - done)
                done = end
    except BaseException:
        reader.stop()
        raise
    reader.thread.join()
    if total > done:
        bar.update(total - done)
    return moved
