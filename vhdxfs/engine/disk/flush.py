"""Commit: what makes writes durable. Flush journals the dirty BAT and sector bitmap pages (group commit:
one log entry per flush); close applies the log and leaves a clean image (LogGuid cleared).

Order (docs/design.md): pages are taken first, data made durable second. A page taken now describes only
writes already issued, and the fdatasync below makes all of those durable before the log can refer to
them; a write that marks its sectors later waits for the next flush. A failed commit (ENOSPC, EIO) gives
the pages back, so the next flush tries again.
"""

from __future__ import annotations

from ..image.dirty import PageBatch
from ..image.headers import HeaderState
from ..image.journal import LogWriter
from .allocate import Allocation
from .steps import Step, StepIO


class Committer:
    """Flush and close of one image opened writable."""

    def __init__(self, headers: HeaderState, writer: LogWriter, allocation: Allocation) -> None:
        self.headers = headers
        self.writer = writer
        self.allocation = allocation
        sources = [allocation.bat]
        if allocation.bitmaps is not None:
            sources.append(allocation.bitmaps)
        self._sources = sources
        # Reads and writes between their BAT lookup and the end of their host I/O may still use freed space at
        # its old place, so a flush reuses none of it while any of them is in flight (``in_flight``), except
        # for those that say which block they use (``hold``): then only the freed ranges they hold wait.
        self.in_flight = 0
        self.held: dict[int, int] = {}  # file offset of a block -> reads using it (the drivers' short ways)
        self.io: StepIO
        self.lock = None

    def attach(self, io: StepIO) -> None:
        self.io = io
        self.lock = io.new_lock()

    def _journal(self, pages: dict[int, bytes], file_end: int) -> None:
        """Blocking: LogGuid into the headers if the log is empty, then the pages through the log."""
        self.headers.open_log()
        self.writer.commit(pages, file_end)

    def flush(self) -> Step:
        """Every write issued so far is durable once this returns: data first, then the pages via the log."""
        yield (self.io.acquire, self.lock)
        try:
            allocator = self.allocation.allocator
            batch = PageBatch(self._sources)
            freed = allocator.take_pending()  # discards in these pages; later ones wait for the next flush
            file_end = allocator.grown  # the file's real length: growth still under way is not claimed
            try:
                yield (self.io.fdatasync,)
                if batch.pages:
                    yield (self.io.call, self._journal, batch.pages, file_end)
            except BaseException:
                batch.restore()
                allocator.keep_pending(freed)
                raise
            if self.in_flight == 0:
                busy = [r for r in freed if self._is_held(r)]
                allocator.reuse([r for r in freed if r not in busy])
                allocator.keep_pending(busy)
            else:
                allocator.keep_pending(freed)
        finally:
            self.lock.release()

    def hold(self, block_offset: int) -> None:
        """A read will use the block at ``block_offset`` of the file until ``let_go``: freed, it waits."""
        self.held[block_offset] = self.held.get(block_offset, 0) + 1

    def let_go(self, block_offset: int) -> None:
        if (n := self.held[block_offset]) == 1:
            del self.held[block_offset]
        else:
            self.held[block_offset] = n - 1

    def _is_held(self, freed: tuple[int, int]) -> bool:
        offset, length = freed
        return any(offset <= block < offset + length for block in self.held)

    def finish(self) -> Step:
        """After a last flush: the log's pages are durable in place, so LogGuid is cleared (a clean image)."""
        yield (self.io.acquire, self.lock)
        try:
            if self.headers.log_guid is not None:
                yield (self.io.fdatasync,)
                yield (self.io.call, self.headers.close_log)
        finally:
            self.lock.release()
