"""The host of one layer, chosen by where it lives: ``remote.S3File`` for an object in a store (loaded on first
use: a local image never imports the S3 client), the given local factory (``PosixFile``, or a test's) for a
path. Every layer of a chain goes through here, so a local child over a remote base gets one of each.
"""

from __future__ import annotations

import os

from .host import HostFactory, HostIO
from .locations import S3Location, parse


def open_host(where: str | os.PathLike[str] | S3Location, *, writable: bool, local_factory: HostFactory) -> HostIO:
    """The host of one image: the S3 host for an object, ``local_factory`` for a path."""
    location = parse(where)
    if isinstance(location, S3Location):
        from .remote import S3File
        return S3File(location, writable=writable)
    return local_factory(where, writable=writable)
