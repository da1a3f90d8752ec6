"""Logging into the journal: journald names the daemon once, and every line has its priority.

systemd connects a service's stderr to journald and says so in JOURNAL_STREAM (the stream's device and
inode); journald puts "vhdxfs[PID]:" in front of each line itself. So the daemon writes "<priority>message"
there, and keeps its own "vhdxfs[PID]: LEVEL:" prefix only where no journal adds one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging
from vhdxfs.service.logs import setup_logging
setup_logging(True, False)
log = logging.getLogger("vhdxfs")
log.debug("not shown")
log.info("mounted a.vhdx at /m")
log.warning("cannot record the daemon pid")
log.error("gone wrong")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("daemon failed")
"""


def run_logging(tmp_path: Path, journal_stream: str | None) -> tuple[list[str], int]:
    out = tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with out.open("wb") as f:
        if journal_stream == "this file":
            st = os.fstat(f.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        child = subprocess.Popen([sys.executable, "-c", SCRIPT], stderr=f, env=env)
        assert child.wait(timeout=60) == 0, out.read_text()
    return out.read_text().splitlines(), child.pid


def test_into_the_journal_each_line_has_its_priority_and_no_name(tmp_path):
    lines, _ = run_logging(tmp_path, "this file")
    assert lines[:3] == ["<6>mounted a.vhdx at /m", "<4>cannot record the daemon pid", "<3>gone wrong"]
    assert lines[3] == "<3>daemon failed"
    assert "<3>Traceback (most recent call last):" in lines
    assert lines[-1] == "<3>ValueError: boom"
    assert all(line.startswith(("<3>", "<4>", "<6>")) for line in lines), lines  # every traceback line too
    assert not any("vhdxfs[" in line or "INFO" in line for line in lines), lines


def test_elsewhere_the_lines_name_the_daemon(tmp_path):
    """A terminal, a file, or a stream that is not the one JOURNAL_STREAM names (a child whose stderr was
    redirected inherits the variable): the name, pid and level stay in the line."""
    for stream in (None, "1:2", "garbage"):
        lines, pid = run_logging(tmp_path, stream)
        assert lines[0] == f"vhdxfs[{pid}]: INFO: mounted a.vhdx at /m", (stream, lines)
        assert lines[1] == f"vhdxfs[{pid}]: WARNING: cannot record the daemon pid"
