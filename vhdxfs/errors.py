"""The one exception hierarchy of vhdxfs.

Every error carries an errno (so the FUSE and NBD layers answer without guessing), a typed ``reason``
(so code that must tell failures apart matches on it, never on the English), and a message that names the
file and, where there is one, the on-disk field or the option that is wrong.
"""

from __future__ import annotations

import errno as _errno
from enum import StrEnum


class Reason(StrEnum):
    """What went wrong, for code that must tell failures apart (repair, check, the CLI's exit codes).

    The ``CORRUPT_*`` reasons name the structure that is damaged, in the order an open reads them.
    """

    # The file is not an image we can use at all.
    NOT_VHDX = "not-vhdx"
    TRUNCATED = "truncated"  # shorter than a structure it must hold (the 1 MiB header section)
    # A structure is damaged (CorruptImageError).
    CORRUPT_HEADER = "corrupt-header"
    CORRUPT_LOG = "corrupt-log"
    CORRUPT_REGION_TABLE = "corrupt-region-table"
    CORRUPT_METADATA = "corrupt-metadata"
    CORRUPT_BAT = "corrupt-bat"
    # Valid, but not for us (UnsupportedError).
    UNSUPPORTED = "unsupported"
    # Differencing chains (ParentError).
    PARENT_NOT_FOUND = "parent-not-found"
    PARENT_MISMATCH = "parent-mismatch"  # another DataWriteGuid, size or sector size
    PARENT_CHAIN = "parent-chain"  # a loop, or deeper than we follow
    FROZEN = "frozen"  # a layer that checkpoints depend on: only read (engine/image/chainrecord.py)
    # Using an image.
    LOCKED = "locked"
    DENIED = "denied"  # the host's permissions or settings refuse it (errno EACCES or EPERM)
    NOT_FOUND = "not-found"  # a file named on the command line is not there
    READ_ONLY = "read-only"
    OUT_OF_RANGE = "out-of-range"
    CLOSED = "closed"
    HOST_IO = "host-io"  # the host file system failed an operation; errno says how
    TIMED_OUT = "timed-out"  # waited as long as promised, and it is still not done
    INTERRUPTED = "interrupted"  # a stop signal came first
    # Asking for something that cannot be done.
    BAD_ARGUMENT = "bad-argument"
    EXISTS = "exists"
    NO_ROOM = "no-room"  # a structure has no room for the change (log, metadata region)
    DATA_IN_THE_WAY = "data-in-the-way"  # e.g. a shrink would drop data
    INTERNAL = "internal"  # a broken promise inside vhdxfs: a bug


class VhdxError(Exception):
    """Base of every error vhdxfs raises on purpose."""

    default_errno = _errno.EIO
    default_reason = Reason.INTERNAL

    def __init__(self, message: str, *, path: object = None, field: str | None = None,
                 errno: int | None = None, reason: Reason | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.field = field
        self.errno = errno if errno is not None else self.default_errno
        self.reason = reason if reason is not None else self.default_reason
        self.message = message
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        what = f"{self.field}: " if self.field else ""
        return f"{where}{what}{self.message}"

    def with_path(self, path: object) -> VhdxError:
        """Fill in the file name when a lower layer did not know it."""
        if self.path is None:
            self.path = str(path)
            self.args = (self.__str__(),)
        return self


class CorruptImageError(VhdxError):
    """The file is not a valid VHDX image, or a structure in it is damaged (``reason`` says which)."""

    default_errno = _errno.EUCLEAN

    def __init__(self, message: str, *, reason: Reason, path: object = None, field: str | None = None,
                 errno: int | None = None) -> None:
        super().__init__(message, path=path, field=field, errno=errno, reason=reason)


class NotVhdxError(VhdxError):
    """The file is not a VHDX image at all (no file type identifier)."""

    default_errno = _errno.EINVAL
    default_reason = Reason.NOT_VHDX


class UnsupportedError(VhdxError):
    """Valid per the spec, but something this implementation does not do (e.g. unknown required region)."""

    default_errno = _errno.EOPNOTSUPP
    default_reason = Reason.UNSUPPORTED


class ImageLockedError(VhdxError):
    """Another process holds a conflicting lock on the image."""

    default_errno = _errno.EBUSY
    default_reason = Reason.LOCKED


class ReadOnlyError(VhdxError):
    """A write was attempted on an image opened read-only."""

    default_errno = _errno.EROFS
    default_reason = Reason.READ_ONLY


class OutOfRangeError(VhdxError):
    """A request lies (partly) beyond the end of the virtual disk."""

    default_errno = _errno.EINVAL
    default_reason = Reason.OUT_OF_RANGE


class HostIOError(VhdxError):
    """The host file system failed an operation (EIO, ENOSPC, ...); errno is the host's."""

    default_reason = Reason.HOST_IO


class UsageError(VhdxError):
    """A command-line argument is wrong (bad size, conflicting options)."""

    default_errno = _errno.EINVAL
    default_reason = Reason.BAD_ARGUMENT


class ParentError(VhdxError):
    """A differencing image's parent cannot be found or does not match."""

    default_errno = _errno.ENOENT
    default_reason = Reason.PARENT_NOT_FOUND
