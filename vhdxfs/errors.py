"""The one exception hierarchy of vhdxfs.

Every error carries an errno (so the FUSE layer can answer the kernel without guessing) and a message
that names the file and, where there is one, the on-disk field that is wrong.
"""

from __future__ import annotations

import errno as _errno


class VhdxError(Exception):
    """Base of every error vhdxfs raises on purpose."""

    default_errno = _errno.EIO

    def __init__(self, message: str, *, path: object = None, field: str | None = None,
                 errno: int | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.field = field
        self.errno = errno if errno is not None else self.default_errno
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
    """The file is not a valid VHDX image, or a structure in it is damaged."""

    default_errno = _errno.EUCLEAN


class NotVhdxError(VhdxError):
    """The file is not a VHDX image at all (no file type identifier)."""

    default_errno = _errno.EINVAL


class UnsupportedError(VhdxError):
    """Valid per the spec, but something this implementation does not do (e.g. unknown required region)."""

    default_errno = _errno.EOPNOTSUPP


class ImageLockedError(VhdxError):
    """Another process holds a conflicting lock on the image."""

    default_errno = _errno.EBUSY


class ReadOnlyError(VhdxError):
    """A write was attempted on an image opened read-only."""

    default_errno = _errno.EROFS


class OutOfRangeError(VhdxError):
    """A request lies (partly) beyond the end of the virtual disk."""

    default_errno = _errno.EINVAL


class HostIOError(VhdxError):
    """The host file system failed an operation (EIO, ENOSPC, ...); errno is the host's."""


class UsageError(VhdxError):
    """A command-line argument is wrong (bad size, conflicting options)."""

    default_errno = _errno.EINVAL


class ParentError(VhdxError):
    """A differencing image's parent cannot be found or does not match."""

    default_errno = _errno.ENOENT
