"""Where an image lives: a local path, or an object in an S3 store (``s3://BUCKET/KEY``).

A ``Location`` is what the engine and the front ends pass around where an image may be remote: a
``pathlib.Path`` for a file here, an ``S3Location`` for an object. Text becomes one through ``parse``,
which keeps ``s3://`` URLs whole (``Path("s3://b/k")`` would make them ``s3:/b/k``). An ``S3Location``
answers the few questions of a path that make sense for an object (``name``, ``stem``, ``suffix``,
``parent``, ``/``), so a locator's relative path resolves against a remote child as against a local one,
and has no ``__fspath__``: nothing can hand it to the OS by mistake.

``hosts.open_host`` picks the host of one layer by its scheme.
"""

from __future__ import annotations

import errno
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Union

from ...errors import UsageError

SCHEME = "s3://"


@dataclass(frozen=True)
class S3Location:
    """An object in an S3 bucket; the store (endpoint, credentials) comes from the environment."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> S3Location:
        """The object's "folder": the key up to its last slash (relative paths resolve against it)."""
        return S3Location(self.bucket, posixpath.dirname(self.key))

    def __truediv__(self, other: str | PurePosixPath) -> S3Location:
        key = posixpath.normpath(posixpath.join(self.key, str(other))) if self.key else str(other)
        if key.startswith("../") or key == "..":
            raise UsageError(f"{other} leads out of the bucket", path=self)
        return S3Location(self.bucket, key.lstrip("/"))

    def with_name(self, name: str) -> S3Location:
        return self.parent / name


Location = Union[Path, S3Location]  # noqa: UP007 - a run-time alias


def is_remote(where: object) -> bool:
    """Whether ``where`` (text, a path or a Location) names an object in a store."""
    return isinstance(where, S3Location) or (isinstance(where, str) and where.startswith(SCHEME))


def parse(where: str | os.PathLike[str] | S3Location) -> Location:
    """A Location for text as a user gives it: ``s3://BUCKET/KEY`` or a local path (left as given)."""
    if isinstance(where, S3Location):
        return where
    if isinstance(where, str) and where.startswith(SCHEME):
        bucket, _, key = where[len(SCHEME):].partition("/")
        if not bucket or not key or key.endswith("/"):
            raise UsageError("an S3 URL names a bucket and an object: s3://BUCKET/KEY", path=where,
                             errno=errno.EINVAL)
        return S3Location(bucket, key)
    return Path(where)


def absolute(where: str | os.PathLike[str] | S3Location) -> str:
    """Text naming ``where`` from anywhere (a daemon works from /): an absolute path, or the URL as it is."""
    location = parse(where)
    return str(location) if isinstance(location, S3Location) else os.path.abspath(location)


def real(where: str | os.PathLike[str] | S3Location) -> str:
    """One spelling per image, to compare two names: realpath of a path, the URL of an object."""
    location = parse(where)
    return str(location) if isinstance(location, S3Location) else os.path.realpath(location)


def exists(where: str | os.PathLike[str] | S3Location) -> bool:
    """Whether a local image file is there; an object is taken to be (its open says if it is not)."""
    location = parse(where)
    return True if isinstance(location, S3Location) else location.is_file()


def local(where: Location, what: str) -> Path:
    """``where`` as a local path, or a clear refusal: ``what`` cannot be done to an object in a store."""
    if isinstance(where, S3Location):
        from ...errors import ReadOnlyError
        raise ReadOnlyError(f"{what}: an image in an object store is only read (make a local child of it with "
                            "'vhdxfs create CHILD --parent URL')", path=where)
    return where
