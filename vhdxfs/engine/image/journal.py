"""The VHDX log at work: replay on open (into the file, or into an in-memory overlay) and the log writer.

Order of a metadata change (docs/design.md): payload data is durable first, then the changed 4 KiB
metadata pages go into a log entry that is made durable, and only then are the pages written to their
final place. Each entry we write is a sequence of its own (its tail points to itself), because before
writing it we make the previous entry's pages durable with the same fdatasync that covers payload data.
An entry never exceeds half the log, so a torn write of the newest entry can never destroy the one
before it: replay then finds that previous entry and rewrites pages that already hold its contents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import CorruptImageError, Reason, VhdxError
from ...format import log as logfmt
from ...format.constants import HEADER_OFFSETS, HEADER_SIZE, LOG_SECTOR_SIZE, MiB, TiB
from ...format.header import Header
from .headers import HeaderState
from .host import HostIO

# No VHDX file is larger than its payload (64 TiB at most) plus metadata; refuse logs that claim more.
MAX_FILE_OFFSET = 128 * TiB
# Log entries must never rewrite the file identifier or the headers (2.2.1, 2.2.2).
FIRST_LOGGABLE_OFFSET = HEADER_OFFSETS[1] + HEADER_SIZE


@dataclass
class Overlay:
    """Replayed log updates kept in memory, for read-only opens of an image with a dirty log (note <5>)."""

    ops: list[logfmt.ZeroDescriptor | logfmt.DataDescriptor] = field(default_factory=list)
    min_size: int = 0  # LastFileOffset of the replayed sequence: the file reads as if this long

    def __bool__(self) -> bool:
        return bool(self.ops)

    def ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """[start, end) of every replayed update inside [offset, offset+length)."""
        out = []
        for op in self.ops:
            n = LOG_SECTOR_SIZE if isinstance(op, logfmt.DataDescriptor) else op.length
            start, end = max(op.file_offset, offset), min(op.file_offset + n, offset + length)
            if start < end:
                out.append((start, end))
        return out

    def patch(self, offset: int, buf: bytearray) -> None:
        """Apply every replayed update that intersects [offset, offset+len(buf)) to ``buf``, in order."""
        end = offset + len(buf)
        for op in self.ops:
            if isinstance(op, logfmt.DataDescriptor):
                start, stop = op.file_offset, op.file_offset + LOG_SECTOR_SIZE
            else:
                start, stop = op.file_offset, op.file_offset + op.length
            lo, hi = max(start, offset), min(stop, end)
            if lo >= hi:
                continue
            if isinstance(op, logfmt.DataDescriptor):
                buf[lo - offset:hi - offset] = op.data[lo - start:hi - start]
            else:
                buf[lo - offset:hi - offset] = bytes(hi - lo)


def _check_sequence(entries: list[logfmt.LogEntry], header: Header, file_size: int, path: object) -> None:
    head = entries[-1]
    if file_size < head.flushed_file_offset:
        raise CorruptImageError(f"file is {file_size} bytes but the log says at least {head.flushed_file_offset} "
                                "were flushed: the file was truncated", path=path,
                                field="LogEntry.FlushedFileOffset", reason=Reason.CORRUPT_LOG)
    if head.last_file_offset > MAX_FILE_OFFSET:
        raise CorruptImageError(f"log claims a file size of {head.last_file_offset} bytes", path=path,
                                field="LogEntry.LastFileOffset", reason=Reason.CORRUPT_LOG)
    log_start, log_end = header.log_offset, header.log_offset + header.log_length
    limit = max(head.last_file_offset, file_size)
    for entry in entries:
        for d in entry.descriptors:
            length = LOG_SECTOR_SIZE if isinstance(d, logfmt.DataDescriptor) else d.length
            end = d.file_offset + length
            if d.file_offset < FIRST_LOGGABLE_OFFSET or end > limit or (d.file_offset < log_end
                                                                         and end > log_start):
                raise CorruptImageError(f"log entry {entry.sequence_number} writes {length} bytes at "
                                        f"{d.file_offset}, outside the structures a log may update",
                                        path=path, field="LogDescriptor.FileOffset", reason=Reason.CORRUPT_LOG)


def read_active_sequence(host: HostIO, header: Header) -> list[logfmt.LogEntry]:
    """The entries to replay, validated; [] when the log is empty or holds no valid sequence."""
    if header.log_is_empty:
        return []
    log = host.pread(header.log_offset, header.log_length)
    entries = logfmt.find_active_sequence(log, header.log_guid)
    if entries:
        _check_sequence(entries, header, host.size(), host.path)
    return entries


def replay_into_file(host: HostIO, entries: list[logfmt.LogEntry]) -> None:
    """Write every update of the active sequence to its place, extend the file, make it durable."""
    for entry in entries:
        for d in entry.descriptors:
            if isinstance(d, logfmt.DataDescriptor):
                host.pwrite(d.file_offset, d.data)
            else:
                host.write_zeros(d.file_offset, d.length)
    if entries and host.size() < entries[-1].last_file_offset:
        host.truncate(entries[-1].last_file_offset)
    host.fdatasync()


def replay_into_overlay(entries: list[logfmt.LogEntry]) -> Overlay:
    overlay = Overlay()
    for entry in entries:
        overlay.ops.extend(entry.descriptors)
    if entries:
        overlay.min_size = entries[-1].last_file_offset
    return overlay


class LogWriter:
    """Writes metadata pages through the log. Not reentrant: the engine holds its commit lock around it."""

    def __init__(self, host: HostIO, headers: HeaderState) -> None:
        self.host = host
        self.headers = headers  # the LogGuid of the entries is the one in the headers
        self.log_offset = headers.header.log_offset
        self.log_length = log_length = headers.header.log_length
        self.sequence_number = 0
        self.head = 0
        self.entries_written = 0
        # Largest entry: half the log, so the newest entry never overwrites the one before it.
        self.max_entry = log_length // 2

    @property
    def max_pages_per_entry(self) -> int:
        sectors = self.max_entry // LOG_SECTOR_SIZE
        pages = sectors - logfmt.descriptor_sectors(sectors)
        if pages < 1:
            raise VhdxError("log is too small to hold one update", path=self.host.path, field="Header.LogLength",
                            reason=Reason.NO_ROOM)
        return pages

    def commit(self, pages: dict[int, bytes], file_size: int) -> None:
        """Make ``pages`` (file offset -> 4 KiB) durable through the log and write them in place.

        Precondition: everything the pages refer to (payload data, the file's size, the pages of an earlier
        entry) is durable already, and the headers carry a LogGuid (HeaderState.open_log).
        """
        log_guid = self.headers.log_guid
        assert log_guid is not None
        items = sorted(pages.items())
        per_entry = self.max_pages_per_entry
        flushed = file_size // MiB * MiB
        last = -(-file_size // MiB) * MiB
        for start in range(0, len(items), per_entry):
            group = items[start:start + per_entry]
            self.sequence_number += 1
            length = logfmt.entry_size(len(group))
            if self.head + length > self.log_length:
                self.head = 0
            entry = logfmt.encode_entry(sequence_number=self.sequence_number, tail=self.head, log_guid=log_guid,
                                        flushed_file_offset=flushed, last_file_offset=last, writes=group)
            self.host.pwrite(self.log_offset + self.head, entry)
            self.host.fdatasync()
            self.head = (self.head + length) % self.log_length
            self.entries_written += 1
            for offset, page in group:
                self.host.pwrite(offset, page)
            if start + per_entry < len(items):
                self.host.fdatasync()  # the next entry may only follow once these pages are durable
