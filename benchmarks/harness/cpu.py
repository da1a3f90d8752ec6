"""CPU accounting from /proc for the NBD harness: what the daemon spends per request, and what else ran.

At queue depth 16 the throughput of a Python server hides its cost; CPU microseconds per request do not
(README "NBD" compares them with qemu-nbd's). And on a shared 2-CPU VM other work moves the figures more
than most changes do, so every job also records how many CPUs were busy with neither fio nor the server.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
QUIET = 0.25  # CPUs busy with other work below which the machine counts as quiet


def cpu_ticks(pid: int, thread: int | None = None) -> int:
    """utime + stime of a process (all its threads), or of one of its threads."""
    path = f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(") ", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all CPUs; /proc/stat, idle and iowait left out)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / TICK


def wait_quiet(limit: float) -> float:
    """Wait (up to limit seconds) until the machine is quiet: under QUIET CPUs busy over half a second.
    Returns the seconds waited. Our own daemons are idle between jobs, so what is busy is someone else."""
    t0 = time.monotonic()
    while True:
        busy0 = machine_busy_s()
        time.sleep(0.5)
        if (machine_busy_s() - busy0) / 0.5 < QUIET or time.monotonic() - t0 >= limit:
            return time.monotonic() - t0


def children_cpu_s() -> float:
    """CPU seconds of our reaped children and their descendants (fio and its job processes, once waited for)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime
