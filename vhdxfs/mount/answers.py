"""How the mount answers errors: every VhdxError becomes the FUSEError of its errno, so the kernel gets
EROFS, ENOSPC or EIO as it is; with --debug each request is traced."""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from ..errors import VhdxError

log = logging.getLogger("vhdxfs.mount")
P = ParamSpec("P")
T = TypeVar("T")


def fuse_error(name: str, exc: Exception) -> pyfuse3.FUSEError:
    """The FUSEError to answer for ``exc`` raised by handler ``name``, with the cause logged: VhdxError and
    OSError keep their errno; anything else (a bug) answers EIO with the traceback in the log, since pyfuse3
    would otherwise let it end the whole FUSE loop, and one failed request is kinder to a VM than its whole
    disk vanishing."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, VhdxError | OSError):
        log.warning("%s: %s", name, exc)
        return pyfuse3.FUSEError(exc.errno or errno.EIO)
    log.error("%s: unexpected error, answering EIO", name, exc_info=exc)
    return pyfuse3.FUSEError(errno.EIO)


def fuse_errors(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Answer what ``fn`` raises as ``fuse_error`` says; with --debug, trace each request (file handle,
    offset, length). read and write do the same inline: a wrapper's coroutine is a cost on every request."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        if log.isEnabledFor(logging.DEBUG):
            trace(fn.__name__, args[1:])
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:
            raise fuse_error(fn.__name__, exc) from None

    return wrapper


def trace(name: str, args: tuple[Any, ...]) -> None:
    shown = [a if not isinstance(a, bytes | memoryview) else f"<{len(a)} bytes>" for a in args]
    log.debug("%s%s", name, tuple(shown))
