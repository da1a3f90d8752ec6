"""The options both front ends take, and their checks: a typo must stop a run before it makes an image.

Shared so that benchmarks/run and benchmarks/run-nbd spell the same thing the same way: --size, --quick,
--rounds, --runtime, --contenders, --baseline, --jobs, --workdir, --results.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .baseline import BASELINE, checkout
from .jobs import JOBS, default_runtime, unmatched
from .procs import HERE, REPO, GiB, parse_size


def parser(prog: str, doc: str | None, default: Sequence[str], optional: Sequence[str], *, quick: str,
           rounds: str, jobs_example: str) -> argparse.ArgumentParser:
    """The shared options; default: the contenders run unless --contenders says otherwise, in visiting
    order; optional: those run only when named."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="8G", help="virtual size of the test image (default 8G)")
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--rounds", type=int, default=1, help=rounds)
    ap.add_argument("--runtime", type=float, metavar="SECONDS",
                    help=f"seconds of each timed job (default {default_runtime(False):g}, "
                         f"{default_runtime(True):g} with --quick)")
    every = [*default, *optional, BASELINE]
    ap.add_argument("--contenders", default=",".join(default),
                    help=f"comma-separated, from {','.join(every)} (default: {','.join(default)}; "
                         f"{BASELINE} is added by --baseline, right after vhdxfs)")
    ap.add_argument("--baseline", metavar="DIR",
                    help=f"a checkout of vhdxfs (e.g. a git worktree of the commit before a change): adds "
                         f"contender {BASELINE}, the vhdxfs contender run from DIR's code (this venv's "
                         f"interpreter, PYTHONPATH=DIR), and the column vhdxfs/{BASELINE} (ratio of medians). "
                         f"A/B: --contenders vhdxfs,{BASELINE} --baseline DIR --rounds N visits A B B A A B B A ...")
    ap.add_argument("--jobs", metavar="NAME,NAME",
                    help="run only these jobs: a pattern equal to a job's name picks that job, otherwise every "
                         f"job whose name contains it (case-insensitive), e.g. {jobs_example}")
    ap.add_argument("--workdir", default="/var/tmp", help="where the images go (default /var/tmp)")
    ap.add_argument("--results", default=str(HERE / "results"),
                    help="where the JSON and Markdown go (default benchmarks/results)")
    return ap


def finish(ap: argparse.ArgumentParser, args: argparse.Namespace, front: str, known: Sequence[str],
           patterns: Sequence[str] = ("jobs",)) -> None:
    """Check and normalise the shared options in place (argparse's error and exit on nonsense).

    known: every contender this front end has but vhdxfs-base. patterns: the options naming jobs."""
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if bad := set(args.contenders) - {*known, BASELINE}:
        ap.error(f"unknown contender(s): {', '.join(sorted(bad))}")
    if len(set(args.contenders)) != len(args.contenders):
        ap.error("a contender is named twice")
    if args.baseline:
        src = checkout(args.baseline, itself=REPO)
        if isinstance(src, str):
            ap.error(f"--baseline {src}")
        args.baseline = src
        if BASELINE not in args.contenders:  # visited right after vhdxfs: the pair shares the machine's phase
            at = args.contenders.index("vhdxfs") + 1 if "vhdxfs" in args.contenders else len(args.contenders)
            args.contenders.insert(at, BASELINE)
    elif BASELINE in args.contenders:
        ap.error(f"contender {BASELINE} needs --baseline DIR")
    if args.runtime is None:
        args.runtime = default_runtime(args.quick)
    elif args.runtime <= 0:
        ap.error("--runtime must be positive")
    every = JOBS[front](False, 8 * GiB)
    for opt in patterns:
        if getattr(args, opt):
            chosen = [p.strip() for p in getattr(args, opt).split(",") if p.strip()]
            setattr(args, opt, chosen)
            if missing := unmatched(every, chosen):
                ap.error(f"--{opt}: no job matches {', '.join(map(repr, missing))}; "
                         f"the jobs: {'; '.join(j['name'] for j in every)}")
    if args.rounds < 0:
        ap.error("--rounds must be 0 or more")
    try:
        parse_size(args.size)
    except (ValueError, IndexError):
        ap.error(f"--size {args.size}: not a size (e.g. 8G)")
