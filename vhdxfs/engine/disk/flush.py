"""Flush: what makes writes durable. Flush journals the dirty BAT and sector bitmap pages (group commit:
one log entry per flush); close applies the log and leaves a clean image (LogGuid cleared).

Order (docs/design.md): pages are taken first, data made durable second. A page taken now describes only
writes already issued, and the fdatasync below makes all of those durable before the log can refer to
them; a write that marks its sectors later waits for the next flush. A failed commit (ENOSPC, EIO) gives
the pages back, so the next flush tries again.
"""

from __future__ import annotations

from ...errors import Reason, VhdxError
from ..image.dirty import PageBatch, PageSource
from ..image.headers import HeaderState
from ..image.journal import LogWriter
from .allocate import Allocation
from .guards import BlockGuards
from .steps import Step, StepIO, StepLock


class Flusher:
    """Flush and close of one image opened writable."""

    def __init__(self, headers: HeaderState, writer: LogWriter, allocation: Allocation, guards: BlockGuards) -> None:
        self.headers = headers
        self.writer = writer
        self.allocation = allocation
        sources: list[PageSource] = [allocation.bat]
        if allocation.bitmaps is not None:
            sources.append(allocation.bitmaps)
        self._sources = sources
        # Reads and writes hold the blocks whose bytes they move (guards.py): a freed range they hold may still
        # be used at its old place, so it waits for the next flush; every other freed range is reused.
        self.guards = guards
        self.io: StepIO
        self.lock: StepLock

    def sources(self) -> list[PageSource]:
        """What a flush journals: the BAT, and the sector bitmaps of a differencing image."""
        return self._sources

    def attach(self, io: StepIO) -> None:
        self.io = io
        self.lock = io.new_lock()

    def _journal_atomic(self, pages: dict[int, bytes], file_end: int) -> None:
        """Blocking: ``pages`` through the log as one entry (refused, before anything is written, if they
        do not fit one)."""
        if len(pages) > self.writer.max_pages_per_entry:
            raise VhdxError(f"the change needs {len(pages)} log pages at once but one log entry holds "
                            f"{self.writer.max_pages_per_entry}", path=self.writer.host.path,
                            field="Header.LogLength", reason=Reason.NO_ROOM)
        self._journal(pages, file_end)

    def _journal(self, pages: dict[int, bytes], file_end: int) -> None:
        """Blocking: LogGuid into the headers if the log is empty, then the pages through the log."""
        self.headers.open_log()
        self.writer.commit(pages, file_end)

    def flush(self, *, extra: dict[int, bytes] | None = None) -> Step[None]:
        """Every write issued so far is durable once this returns: data first, then the pages via the log.

        ``extra``: metadata pages to change too (a live merge re-points the parent locator of the layer this
        daemon writes), through the same log, after the flush's own pages and as one entry of their own, so
        a crash applies all of them or none."""
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
            holds = self.guards.holds
            allocator.reuse([r for r in freed if not holds(r[0])])
            allocator.keep_pending([r for r in freed if holds(r[0])])
            if extra:
                yield (self.io.fdatasync,)
                yield (self.io.call, self._journal_atomic, extra, allocator.grown)
        finally:
            self.lock.release()

    def finish(self) -> Step[None]:
        """After a last flush: the log's pages are durable in place, so LogGuid is cleared (a clean image)."""
        yield (self.io.acquire, self.lock)
        try:
            if self.headers.log_guid is not None:
                yield (self.io.fdatasync,)
                yield (self.io.call, self.headers.close_log)
        finally:
            self.lock.release()
