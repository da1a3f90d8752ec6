"""benchmarks/run-nbd's report: the ratio table with each cell's spread, the daemon CPU per request, the
machine's other load, the A/B against vhdxfs-base, the exact commands, and the profiles.

The commands are in the report because NBD figures depend on details that are easy to get wrong (qemu-nbd's
-e, fio's iodepth, pinning): whoever reads the figures can rerun exactly what made them.
"""

from __future__ import annotations

import os
import shlex
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from .baseline import BASELINE
from .cpu import QUIET
from .jobs import Job
from .procs import REPO, VENV, MiB
from .profiler import profile_text
from .results import (
    comparison_lines,
    git_state,
    machine,
    machine_line,
    medians,
    noisy_lines,
    ratio_table,
    values,
)

if TYPE_CHECKING:
    from .nbd import NbdBench

TOOLS = {"qemu-nbd": ["qemu-nbd", "--version"], "nbdkit": ["nbdkit", "--version"],
         "py-spy": [str(VENV / "py-spy"), "--version"], "strace": ["strace", "-V"]}


def figure(job: Job, v: float) -> str:
    return f"{v / 1000:.1f}k" if job["bs"] == "4k" else f"{v:.0f}"


def table(nb: NbdBench) -> str:
    names, med = nb.args.contenders, medians(nb)

    def cell(job: Job, c: str) -> str:
        v = values(nb, c, job)
        failed = len(nb.job_errors.get(c, {}).get(job["name"], []))
        if not v:
            return "failed" if failed else "n/a"
        text = figure(job, v[0]) if len(v) == 1 else \
            f"{figure(job, med[c][job['name']])} ({figure(job, min(v))}–{figure(job, max(v))})"
        return text + (f", {failed} failed" if failed else "")

    lines = ratio_table(nb, names, header=lambda c: f"{c} median (min–max)", cell=cell)
    return "\n".join(lines + cpu_lines(nb) + noisy_lines(nb) + other_load_lines(nb) + comparison_lines(nb))


def cpu_lines(nb: NbdBench) -> list[str]:
    """Daemon CPU per request: what a server costs, whatever the throughput (the main thread in brackets)."""
    names = nb.args.contenders
    lines = ["", "Daemon CPU time per request, median (us; utime+stime of all its threads / requests; "
             "in brackets: its main thread, where it serves requests):", "",
             "| job | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for job in nb.jobs:
        cells = []
        for c in names:
            ss = nb.results.get(c, {}).get(job["name"], [])
            if not ss or ss[0].get("cpu_us_per_io") is None:
                cells.append("n/a")
                continue
            cpu = statistics.median(s["cpu_us_per_io"] for s in ss)
            main = statistics.median(s["main_cpu_us_per_io"] for s in ss)
            cells.append(f"{cpu:.1f} ({main:.1f})" if main >= 0.05 else f"{cpu:.1f}")  # nbdkit: workers serve
        lines.append(f"| {job['name']} | " + " | ".join(cells) + " |")
    return lines


def other_load_lines(nb: NbdBench) -> list[str]:
    """How busy the machine was with other work during the jobs, per contender."""
    others = {c: [s["other_cpus"] for ss in per.values() for s in ss if "other_cpus" in s]
              for c, per in nb.results.items()}
    if not any(others.values()):
        return []
    return ["", f"CPUs busy with other work (not fio, not the server) during the jobs, of {os.cpu_count()}: "
            + "; ".join(f"{c} median {statistics.median(v):.2f}, max {max(v):.2f}, above "
                        f"{QUIET:.2f} in {sum(x > QUIET for x in v)} of {len(v)} jobs"
                        for c, v in others.items() if v) + "."]


def code_line(label: str, src: Path) -> str:
    state = git_state(src)
    return (f"{label} code: {src} at {state.get('commit') or '(no git commit)'}"
            f"{' with vhdxfs/ modified' if state.get('vhdxfs_modified') else ''}.\n")


def report(nb: NbdBench, elapsed: float, argv: list[str]) -> str:
    args = nb.args
    text = f"## NBD: `{shlex.join(['benchmarks/run-nbd', *argv])}`\n\n"
    text += code_line("vhdxfs", args.vhdxfs_src or REPO)
    if args.baseline:
        text += code_line(BASELINE, args.baseline)
    text += "\n"
    if nb.results:
        text += table(nb) + "\n"
        text += (f"\nMedians of {args.rounds * 2} visits per contender (order per round: "
                 f"{' '.join(args.contenders + args.contenders[::-1])}), each on a fresh copy of an {args.size} "
                 f"image; {nb.span // MiB} MiB span written by the first job; random jobs and seq read "
                 f"{args.runtime:g} s each; fio --ioengine=nbd over a unix socket.\n")
    text += f"Run took {elapsed / 60:.1f} min. {machine_line(machine(args.workdir))}\n\nServers:\n"
    commands = nb.commands
    for name, c in commands.items():
        if name != "fio":
            env = " ".join(f"{k}={v}" for k, v in c["env"].items())
            text += f"- {name}: `{(env + ' ') if env else ''}{shlex.join(c['server'])}`" + (
                f", then `taskset -a -p -c {c['pinned_to']} PID`" if c.get("pinned_to") else "") + "\n"
    if commands.get("fio"):
        text += "\nfio, per job (SOCK: the contender's socket):\n"
        for j, fio_argv in commands["fio"].items():
            text += f"- {j}: `{shlex.join(fio_argv)}`\n"
    unprofiled = medians(nb).get("vhdxfs", {})
    for p in nb.profiles:
        text += "\n" + profile_text(p, unprofiled.get(p["job"]))
    for name, err in nb.errors.items():
        text += f"\n{name}: n/a ({err})"
    for name, per_job in nb.job_errors.items():
        for j, errs in per_job.items():
            text += f"\n{name}, {j}: failed in {len(errs)} visit(s): {errs[0]}"
    return text.rstrip() + "\n"
