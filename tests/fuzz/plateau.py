"""Plateau evidence from libFuzzer logs: coverage and features at 75% and at 100% of the executions.

    python -m tests.fuzz.plateau LOG [LOG...]      # the logs of one target's runs, in the order they ran

A run that was restarted (after a fix) continues the same corpus, so its logs are read as one: the
executions add up. "Plateaued" means no new coverage (libFuzzer's cov) in the last quarter.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_LINE = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+)")
_TIME = re.compile(r"^Done (\d+) runs in (\d+) second")


def points(logs: list[Path]) -> tuple[list[tuple[int, int, int]], int]:
    """(cumulative executions, cov, ft) for every status line, and the seconds the runs took."""
    out: list[tuple[int, int, int]] = []
    base = seconds = 0
    for log in logs:
        last = 0
        for line in log.read_text(errors="replace").splitlines():
            m = _LINE.match(line)
            if m:
                last = int(m.group(1))
                out.append((base + last, int(m.group(3)), int(m.group(4))))
            t = _TIME.match(line)
            if t:
                seconds += int(t.group(2))
        base += last
    return out, seconds


def summary(logs: list[Path]) -> str:
    pts, seconds = points(logs)
    if not pts:
        return "no status lines"
    total = pts[-1][0]
    at75 = max((p for p in pts if p[0] <= 0.75 * total), default=pts[0])
    end = pts[-1]
    flat = "plateaued" if end[1] == at75[1] else f"still growing (+{end[1] - at75[1]} cov)"
    return (f"{total} executions in {seconds} s; at 75% ({at75[0]}): cov {at75[1]} ft {at75[2]}; "
            f"at 100%: cov {end[1]} ft {end[2]}; {flat}")


if __name__ == "__main__":
    print(summary([Path(a) for a in sys.argv[1:]]))
