"""HeaderState: the one owner of an image file's two headers and the GUIDs in them (spec 2.2.2).

Rules (docs/design.md, "Header updates"): every header change writes the next header over the non-current
copy, makes it durable, and does it again, so both copies agree (2.2.2.1). A writable open changes
FileWriteGuid before anything else in the file changes; DataWriteGuid changes before the first change a
reader of the virtual disk could see (a commit into a parent chooses the new value itself, spec note 12);
LogGuid is set before the first log entry is written and cleared once the log's pages are in place.

Everything that changes a header goes through here: the engine's writes and flushes, LoggedUpdate,
repair and commit. The methods may block (header writes are durable writes) and are thread-safe, so the
async wrapper may call them from its worker threads.
"""

from __future__ import annotations

import threading
import uuid

from ...errors import CorruptImageError, Reason, VhdxError
from ...format import guids
from ...format.constants import HEADER_OFFSETS
from ...format.header import Header
from .host import HostIO

_MAX_SEQUENCE = (1 << 64) - 1


class HeaderState:
    """The current header of one open file, and which of the 2.2.2.1 steps this open has taken."""

    def __init__(self, host: HostIO, header: Header, index: int, *, writable: bool,
                 data_write_guid: uuid.UUID | None = None) -> None:
        self._host = host
        self._header = header
        self._index = index
        self.writable = writable
        self._lock = threading.Lock()
        self._file_writes = False
        self._data_writes = False
        self._chosen_data_write_guid = data_write_guid

    @property
    def header(self) -> Header:
        return self._header

    @property
    def index(self) -> int:
        """Which header slot (0 or 1) holds the current header."""
        return self._index

    @property
    def log_guid(self) -> uuid.UUID | None:
        """The LogGuid in force, or None while the log is empty."""
        return None if self._header.log_is_empty else self._header.log_guid

    @property
    def file_writes_begun(self) -> bool:
        """True once this open has changed FileWriteGuid: the first write to the file (2.2.2.1) is done."""
        return self._file_writes

    @property
    def data_writes_begun(self) -> bool:
        """True once this open has changed DataWriteGuid: the virtual disk's contents may have changed."""
        return self._data_writes

    def freeze(self) -> None:
        """No more header changes: the open became read-only (a checkpoint's parent)."""
        with self._lock:
            self.writable = False

    def thaw(self, data_write_guid: uuid.UUID) -> None:
        """Writable again (the target of a live merge): its contents will change, so the first write sets a new
        DataWriteGuid, ``data_write_guid`` (chosen by the merge, as commit does: spec note 12)."""
        with self._lock:
            self.writable = True
            self._data_writes = False
            self._chosen_data_write_guid = data_write_guid

    def update(self, **changes: object) -> None:
        """Write the next header with ``changes`` into both slots, one after the other, each made durable."""
        if not self.writable:
            raise VhdxError("internal: header update on a read-only open", path=self._host.path,
                            reason=Reason.INTERNAL)
        with self._lock:
            self._update(changes)

    def _update(self, changes: dict[str, object]) -> None:
        # SequenceNumber is a UINT64 (2.2.2) and the spec gives no wrap-around: an update that cannot write
        # two larger numbers is refused before it writes anything.
        if self._header.sequence_number > _MAX_SEQUENCE - 2:
            raise CorruptImageError(f"sequence number {self._header.sequence_number} leaves no room for the "
                                    "two newer headers an update writes", path=self._host.path,
                                    field="Header.SequenceNumber", reason=Reason.CORRUPT_HEADER)
        for _ in range(2):
            new = self._header.next(**changes)
            slot = 1 - self._index
            self._host.pwrite(HEADER_OFFSETS[slot], new.encode())
            self._host.fdatasync()
            self._header, self._index = new, slot

    def begin_file_writes(self) -> None:
        """A new FileWriteGuid, once per open, before the first change to the file."""
        with self._lock:
            if not self._file_writes:
                self._update({"file_write_guid": guids.new_guid()})
                self._file_writes = True

    def begin_data_writes(self) -> None:
        """A new DataWriteGuid (or the one the opener chose), once per open, before the first visible change."""
        if self._data_writes:
            return
        with self._lock:
            self._begin_data_writes_locked()

    def _begin_data_writes_locked(self) -> None:
        if not self._data_writes:  # another thread may have begun them while this one waited for the lock
            chosen = self._chosen_data_write_guid
            if chosen is None:
                self._update({"data_write_guid": guids.new_guid()})
            elif self._header.data_write_guid != chosen:
                self._update({"data_write_guid": chosen})
            self._data_writes = True

    def open_log(self) -> uuid.UUID:
        """The LogGuid for new log entries: set a new one in the headers if the log is empty."""
        with self._lock:
            if self._header.log_is_empty:
                self._update({"log_guid": guids.new_guid()})
            return self._header.log_guid

    def close_log(self) -> None:
        """Clear LogGuid: the log's pages are durable in place (the caller made sure), the image is clean."""
        with self._lock:
            if not self._header.log_is_empty:
                self._update({"log_guid": guids.NULL_GUID})
