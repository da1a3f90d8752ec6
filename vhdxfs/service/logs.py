"""Logging of a daemon: stderr in the foreground; syslog in the background, or a file where there is none.

Under systemd the foreground daemon's stderr is a stream into the journal (systemd sets JOURNAL_STREAM to
its device and inode), and journald already puts the identifier and pid in front of every line: then each
line goes out as ``<priority>message``, with no name of ours in front, so the journal shows
``vhdxfs[70]: mounted ...`` once, and ``journalctl -p warning`` finds the warnings.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
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


# syslog(3) priorities of the logging levels, as journald reads them from a "<N>" in front of a line
# (SyslogLevelPrefix=, on by default).
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
DEBUG_PRIORITY = 7


def priority(levelno: int) -> int:
    """The syslog priority of a logging level: CRITICAL 2 (crit), ERROR 3 (err), WARNING 4, INFO 6, DEBUG 7."""
    return next((p for level, p in PRIORITIES if levelno >= level), DEBUG_PRIORITY)


def stderr_is_journal() -> bool:
    """Whether fd 2 is the journal stream systemd gave this service (JOURNAL_STREAM=<device>:<inode>), not a
    terminal or a file that a child of the service was given instead (systemd.exec(5))."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


class JournalFormatter(logging.Formatter):
    """``<priority>message`` on every line: journald gives a multi-line record (a traceback) one entry per
    line, and each of them should carry the record's priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def setup_logging(foreground: bool, debug: bool, log_file: Path | None = None) -> None:
    """stderr in the foreground (``<priority>message`` lines when that is the journal); syslog for a
    daemon, or ``log_file`` where there is no syslog (a container without /dev/log), so a daemon's
    warnings are never silently lost."""
    level = logging.DEBUG if debug else logging.INFO
    handler: logging.Handler
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
        if stderr_is_journal():
            handler.setFormatter(JournalFormatter("%(message)s"))
        else:
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
