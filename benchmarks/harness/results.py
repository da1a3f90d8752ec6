"""Medians, ratio tables, the A/B comparison and the saved results, the same for both front ends.

Ratios are ratios of medians over interleaved visits: on a shared VM a single visit can be off by 1.5x, so
a ratio of two single figures says little, and the cells whose visits disagree by more than 25% are listed
under the table. Everything lands in results/<name>.json (every visit's figures) and results/<name>.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .baseline import BASELINE
from .jobs import Job, headline, unit
from .procs import REPO, log
from .visits import Visits


def values(bench: Visits, contender: str, job: Job) -> list[float]:
    """The headline figure of every visit of contender to job, in visiting order."""
    return [headline(job, s) for s in bench.results.get(contender, {}).get(job["name"], [])]


def medians(bench: Visits) -> dict[str, dict[str, float]]:
    """contender -> job -> median of its visits' headline figure (jobs without a sample left out)."""
    return {c: {job["name"]: statistics.median(v) for job in bench.jobs if (v := values(bench, c, job))}
            for c in bench.args.contenders}


def ratio_refs(names: Sequence[str], against: Sequence[str]) -> list[str]:
    """The ratio columns vhdxfs/<ref>: the references present beside vhdxfs, then vhdxfs-base, shown even
    without vhdxfs (then n/a): the run was an A/B."""
    refs = [r for r in against if r in names and r not in ("vhdxfs", BASELINE) and "vhdxfs" in names]
    return refs + ([BASELINE] if BASELINE in names else [])


def ratio_table(bench: Visits, against: Sequence[str], header: Callable[[str], str],
                cell: Callable[[Job, str], str], unit_of: Callable[[Job], str] = unit) -> list[str]:
    """| job | unit | one column per contender | vhdxfs/<ref> per reference |, one row per job."""
    names, med = bench.args.contenders, medians(bench)
    refs = ratio_refs(names, against)
    lines = ["| job | unit | " + " | ".join([header(c) for c in names] + [f"vhdxfs/{r}" for r in refs]) + " |",
             "|---|---|" + "---:|" * (len(names) + len(refs))]
    for job in bench.jobs:
        j = job["name"]
        v = med.get("vhdxfs", {}).get(j)
        ratios = [f"{v / d:.2f}x" if v and (d := med.get(r, {}).get(j)) else "n/a" for r in refs]
        lines.append(f"| {j} | {unit_of(job)} | " + " | ".join([cell(job, c) for c in names] + ratios) + " |")
    return lines


def noisy_lines(bench: Visits) -> list[str]:
    """The cells whose visits disagree by more than 25% (min–max): read them with care."""
    noisy = []
    for job in bench.jobs:
        for c in bench.args.contenders:
            v = values(bench, c, job)
            if len(v) > 1 and min(v) > 0 and max(v) / min(v) > 1.25:
                noisy.append(f"{job['name']} / {c}: {min(v):.0f}–{max(v):.0f}")
    return ["", "Visits differing by more than 25% (min–max): " + "; ".join(noisy) + "."] if noisy else []


def comparison(bench: Visits) -> dict[str, dict[str, Any]]:
    """vhdxfs against vhdxfs-base per job: every visit's figure (visiting order) and the ratio of medians."""
    med, out = medians(bench), {}
    for job in bench.jobs:
        j = job["name"]
        a, b = med.get("vhdxfs", {}).get(j), med.get(BASELINE, {}).get(j)
        out[j] = {"unit": unit(job), **{c: values(bench, c, job) for c in ("vhdxfs", BASELINE)},
                  "ratio_of_medians": a / b if a and b else None}
    return out


def comparison_lines(bench: Visits) -> list[str]:
    """The A/B in words below the table: every visit, and the ratio flagged when under 0.95."""
    if BASELINE not in bench.args.contenders:
        return []
    lines = ["", f"vhdxfs against {BASELINE} (baseline {bench.args.baseline}), every visit in visiting order:"]
    for j, row in comparison(bench).items():
        ratio = row["ratio_of_medians"]
        flag = " (below 0.95)" if ratio is not None and ratio < 0.95 else ""
        lines.append(f"- {j} ({row['unit']}): vhdxfs " + (", ".join(f"{v:.0f}" for v in row["vhdxfs"]) or "n/a")
                     + f"; {BASELINE} " + (", ".join(f"{v:.0f}" for v in row[BASELINE]) or "n/a")
                     + "; ratio of medians " + ("n/a" if ratio is None else f"{ratio:.3f}") + flag)
    return lines


# -- where and with what the figures were made ----------------------------------------------------------------
def machine(workdir: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, StopIteration):
        mem = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
                  .split()[1]) // (1 << 20)
    fs = " on ".join(subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", workdir],
                                    capture_output=True, text=True).stdout.split())
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "mem_gib": mem, "workdir_fs": fs}


def machine_line(m: dict[str, Any]) -> str:
    return (f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_gib']} GiB RAM, Linux {m['kernel']}, "
            f"images on {m['workdir_fs'] or '?'}.")


def git_state(checkout: Path) -> dict[str, Any]:
    """Commit of a checkout, and whether its vhdxfs/ differs from it (a work in progress is measured)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True).stdout.strip()
    with contextlib.suppress(OSError):
        return {"commit": git("rev-parse", "--short", "HEAD"),
                "vhdxfs_modified": bool(git("status", "--porcelain", "--", "vhdxfs"))}
    return {}


def versions(tools: dict[str, list[str]], baseline: Path | None = None) -> dict[str, Any]:
    """First line of each tool's version, this checkout's commit, and the baseline checkout's."""
    out: dict[str, Any] = {}
    for name, cmd in {"fio": ["fio", "--version"], "qemu": ["qemu-img", "--version"], **tools}.items():
        with contextlib.suppress(OSError):
            text = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
            out[name] = text.splitlines()[0] if text else ""
    state = git_state(REPO)
    out["vhdxfs_commit"], out["vhdxfs_modified"] = state.get("commit"), state.get("vhdxfs_modified")
    if baseline:
        out["baseline"] = {"dir": str(baseline), **git_state(baseline)}
    return out


def record(bench: Visits, stamp: str, elapsed: float, tools: dict[str, list[str]]) -> dict[str, Any]:
    """The JSON both front ends save: results are contender -> job -> one sample per visit, each with its
    visit number (the order is in args); with vhdxfs-base, the comparison too."""
    args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(bench.args).items()}
    out = {"when": stamp, "args": args, "image_bytes": bench.size, "machine": machine(bench.args.workdir),
           "versions": versions(tools, bench.args.baseline), "jobs": bench.jobs, "results": bench.results,
           "errors": bench.errors, "elapsed_s": elapsed}
    if BASELINE in bench.args.contenders:
        out["comparison"] = comparison(bench)
    return out


def save_results(results: str | Path, name: str, data: dict[str, Any], text: str) -> None:
    """results/<name>.json (every figure) and results/<name>.md (the report), for all three harnesses."""
    out = Path(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))
    (out / f"{name}.md").write_text(text)
    log(f"saved {out / name}.json and .md")
