"""Host I/O: the one seam between the engine and the file that holds an image.

``HostIO`` is what the engine needs of a file: positioned reads and writes, fdatasync, size changes, hole
punching. Every method is synchronous and may block. Three kinds stand behind it:

- ``PosixFile`` (posix.py): an OS file, with the image's lock held (the normal case);
- ``MemoryFile``: bytes in memory (tests, fuzzing: no OS file, no lock);
- ``S3File`` (remote.py): an object in an S3 store, read-only, through a block cache;
- fault-injecting files in the tests (tests/crash/powercut.py), which build on ``FileBase`` as these do.

Who calls what: structures (headers, log, region table, metadata, BAT pages, sector bitmaps) are read and
written directly through these methods. Payload data moves through the engine's drivers: directly in the
synchronous one (engine/disk/sync.py), through a write-back queue in the trio one (engine/aio/), which
also keeps the trio loop off the disk.
"""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ...errors import HostIOError
from .locations import Location


class HostIO(Protocol):
    """A file holding an image, as the engine uses it."""

    writable: bool

    @property
    def path(self) -> Location:
        """A local file, or an object in a store (S3File)."""

    def size(self) -> int: ...
    def pread(self, offset: int, length: int) -> bytes: ...
    def pread_into(self, offset: int, view: memoryview) -> None: ...
    def read_cached(self, offset: int, view: memoryview | bytearray) -> bool: ...
    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...
    def fdatasync(self) -> None: ...
    def truncate(self, size: int) -> None: ...
    def punch_hole(self, offset: int, length: int) -> bool: ...
    def write_zeros(self, offset: int, length: int) -> None: ...
    def allocate(self, offset: int, length: int) -> None: ...
    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]: ...
    def set_writable(self, writable: bool) -> None: ...
    def close(self) -> None: ...


# (path, writable=...) -> HostIO: how an image and its parents are opened (tests pass their own).
HostFactory = Callable[..., HostIO]


class FileBase(ABC):
    """What every HostIO derives from its primitives (the abstract methods)."""

    path: Location
    writable: bool

    @abstractmethod
    def size(self) -> int: ...

    @abstractmethod
    def pread_into(self, offset: int, view: memoryview) -> None: ...

    @abstractmethod
    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    @abstractmethod
    def fdatasync(self) -> None: ...

    @abstractmethod
    def truncate(self, size: int) -> None: ...

    @abstractmethod
    def punch_hole(self, offset: int, length: int) -> bool: ...

    @abstractmethod
    def close(self) -> None: ...

    def pread(self, offset: int, length: int) -> bytes:
        """Read exactly ``length`` bytes; what lies past the end of the file reads as zeros."""
        buf = bytearray(length)
        self.pread_into(offset, memoryview(buf))
        return bytes(buf)

    def read_cached(self, offset: int, view: memoryview | bytearray) -> bool:
        """Fill ``view`` without blocking if that can be done; False means: use pread_into instead."""
        return False

    def write_zeros(self, offset: int, length: int) -> None:
        """Make a range read as zeros: punch where the host allows it, else write zeros."""
        if self.punch_hole(offset, length):
            return
        chunk = bytes(min(length, 1 << 20))
        while length > 0:
            n = min(length, len(chunk))
            self.pwrite(offset, chunk[:n])
            offset += n
            length -= n

    def allocate(self, offset: int, length: int) -> None:
        """Reserve space (fixed images); a file without real allocation only grows."""
        if self.size() < offset + length:
            self.truncate(offset + length)

    def set_writable(self, writable: bool) -> None:
        """From now on the open may write (or may no longer): a layer of a running chain that a live merge
        writes into, or the old top that a checkpoint freezes."""
        self.writable = writable

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """[start, end) of the parts of [offset, offset+length) the file may store anything but zeros in;
        a file that cannot tell says all of it."""
        return [(offset, offset + length)]


class MemoryFile(FileBase):
    """An image held in memory: for tests and fuzzing, where no OS file or lock is wanted."""

    def __init__(self, data: bytes | bytearray = b"", *, path: str | os.PathLike[str] = "<memory>",
                 writable: bool = True) -> None:
        self.path = Path(path)
        self.writable = writable
        self.data = bytearray(data)

    def size(self) -> int:
        return len(self.data)

    def pread_into(self, offset: int, view: memoryview) -> None:
        got = self.data[offset:offset + len(view)]
        view[:len(got)] = got
        view[len(got):] = bytes(len(view) - len(got))

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if not self.writable:
            raise HostIOError("file is open read-only", path=self.path, errno=errno.EBADF)
        data = memoryview(data).cast("B")
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    def fdatasync(self) -> None:
        return None

    def truncate(self, size: int) -> None:
        del self.data[size:]
        self.data.extend(bytes(size - len(self.data)))

    def punch_hole(self, offset: int, length: int) -> bool:
        length = max(0, min(length, len(self.data) - offset))
        self.data[offset:offset + length] = bytes(length)
        return True

    def close(self) -> None:
        return None
