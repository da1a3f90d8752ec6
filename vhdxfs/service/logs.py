"""Logging of a daemon: stderr in the foreground; syslog in the background, or a file where there is none."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path


class FallbackLog(logging.FileHandler):
    """The log file of a daemon without syslog; removed after a clean life with nothing worth reading, so
    /run does not fill with one file per daemon ever started. Kept when it already held an earlier
    daemon's lines (say, the last words of one that was killed)."""

    worst = logging.NOTSET

    def __init__(self, path: Path) -> None:
        self.inherited = path.exists() and path.stat().st_size > 0
        super().__init__(path)

    def emit(self, record: logging.LogRecord) -> None:
        self.worst = max(self.worst, record.levelno)
        super().emit(record)

    def discard_if_boring(self) -> None:
        if self.worst < logging.WARNING and not self.inherited:
            self.close()
            Path(self.baseFilename).unlink(missing_ok=True)


def setup_logging(foreground: bool, debug: bool, log_file: Path | None = None) -> None:
    """stderr in the foreground; syslog for a daemon, or ``log_file`` where there is no syslog (a
    container without /dev/log), so a daemon's warnings are never silently lost."""
    level = logging.DEBUG if debug else logging.INFO
    handler: logging.Handler
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vhdxfs[%(process)d]: %(levelname)s: %(message)s"))
    elif Path("/dev/log").exists():
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("vhdxfs[%(process)d]: %(message)s"))
    else:
        handler = logging.NullHandler()
        if log_file is not None:
            try:
                log_file.parent.mkdir(parents=True, exist_ok=True)
                handler = FallbackLog(log_file)
            except OSError:
                pass
        handler.setFormatter(logging.Formatter("%(asctime)s vhdxfs[%(process)d]: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def discard_boring_log() -> None:
    """At a clean exit: drop the fallback log file when nothing in it is worth reading."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, FallbackLog):
            handler.discard_if_boring()
