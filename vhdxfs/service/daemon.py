"""Starting a daemon that tells its starter when it is ready, as `vhdxfs mount` and `vhdxfs serve` do.

The command forks; the child detaches (own session, no terminal, working directory /) and runs the
service, which calls ``ready(None)`` once it serves or ``ready(message)`` when it cannot; the parent
waits on a pipe for that word and exits 0, or fails with the message. So a script may use the mount or
the socket as soon as the command returns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import VhdxError
from .logs import discard_boring_log, setup_logging

log = logging.getLogger("vhdxfs")

# Called once: None when the service is ready, or a one-line message saying why it could not start.
Ready = Callable[[str | None], None]


def run_in_foreground(service: Callable[[Ready], None], debug: bool) -> int:
    """Run ``service`` here, logging to stderr; its failure message becomes the command's error."""
    setup_logging(True, debug)
    failure: list[str] = []

    def ready(message: str | None) -> None:
        if message:
            failure.append(message)

    service(ready)
    if failure:
        raise VhdxError(failure[0])
    return 0


def daemonize(service: Callable[[Ready], None], *, what: str, debug: bool, log_file: Path | None) -> int:
    """Fork; the child runs ``service``, the parent returns 0 once it is ready, or raises its message."""
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
            message = f"the {what} daemon died (status {status}) before it was ready"
        raise VhdxError(message.removeprefix("error:").strip())
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

    def ready(message: str | None) -> None:
        nonlocal write_fd
        if write_fd < 0:
            return
        os.write(write_fd, b"ok\n" if message is None else b"error:" + message.encode())
        os.close(write_fd)
        write_fd = -1

    code = 0
    try:
        service(ready)
    except BaseException as exc:  # the daemon's last words go to the log, and to the parent if it waits
        log.exception("daemon failed")
        ready(f"{what} daemon failed: {exc}")
        code = 1
    if code == 0:
        discard_boring_log()
    os._exit(code)
