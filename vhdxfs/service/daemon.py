"""Starting a daemon that tells its starter when it is ready, as `vhdxfs mount` and `vhdxfs serve` do.

The command forks; the child detaches (own session, no terminal, working directory /) and runs the
service, which calls ``ready(None)`` once it serves or ``ready(error)`` when it cannot; the parent waits on
a pipe for that word and exits 0, or raises the error. So a script may use the mount or the socket as soon
as the command returns. The error crosses the pipe whole (message, errno and ``reason``), so the starter
raises what the daemon met, not a bare message.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import Reason, VhdxError
from .logs import discard_boring_log, setup_logging

log = logging.getLogger("vhdxfs")

# Called once: None when the service is ready, or the error that kept it from starting.
Ready = Callable[[VhdxError | None], None]


def run_in_foreground(service: Callable[[Ready], None], debug: bool) -> int:
    """Run ``service`` here, logging to stderr; the error that kept it from starting is the command's."""
    setup_logging(True, debug)
    failure: list[VhdxError] = []

    def ready(error: VhdxError | None) -> None:
        if error is not None:
            failure.append(error)

    service(ready)
    if failure:
        raise failure[0]
    return 0


def encode_failure(error: VhdxError) -> bytes:
    """What the child writes on the pipe when it cannot start (``decode_failure`` reads it)."""
    return b"error:" + json.dumps({"message": str(error), "errno": error.errno, "reason": error.reason}).encode()


def decode_failure(text: str) -> VhdxError:
    """The error a child wrote with ``encode_failure``; a message of any other shape is kept as it is."""
    body = text.removeprefix("error:").strip()
    try:
        fields = json.loads(body)
        return VhdxError(str(fields["message"]), errno=int(fields["errno"]), reason=Reason(fields["reason"]))
    except (ValueError, KeyError, TypeError):
        return VhdxError(body, reason=Reason.INTERNAL)


def daemonize(service: Callable[[Ready], None], *, what: str, debug: bool, log_file: Path | None) -> int:
    """Fork; the child runs ``service``, the parent returns 0 once it is ready, or raises its error."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message.startswith("ok"):
            return 0
        if not message:
            _, status = os.waitpid(pid, 0)
            raise VhdxError(f"the {what} daemon died (status {status}) before it was ready", reason=Reason.INTERNAL)
        raise decode_failure(message)
    # Child: a session of its own, no terminal, no busy working directory, logging to syslog.
    os.close(read_fd)
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
    setup_logging(False, debug, log_file)

    def ready(error: VhdxError | None) -> None:
        nonlocal write_fd
        if write_fd < 0:
            return
        os.write(write_fd, b"ok\n" if error is None else encode_failure(error))
        os.close(write_fd)
        write_fd = -1

    code = 0
    try:
        service(ready)
    except BaseException as exc:  # the daemon's last words go to the log, and to the parent if it waits
        log.exception("daemon failed")
        ready(VhdxError(f"{what} daemon failed: {exc}", reason=Reason.INTERNAL))
        code = 1
    if code == 0:
        discard_boring_log()
    os._exit(code)
