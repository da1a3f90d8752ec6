"""Run one fuzz target under atheris (coverage-guided, libFuzzer), or replay inputs without it.

    python -m tests.fuzz.run TARGET [--runs N] [--max-time S] [-- LIBFUZZER_ARGS...]
    python -m tests.fuzz.run TARGET --replay FILE_OR_DIR...      # no atheris needed
    python -m tests.fuzz.run TARGET --seed-corpus                # write the starting inputs and stop

TARGET is one of tests/fuzz/targets.py TARGETS. The working corpus is tests/fuzz/work/TARGET (not kept in
git); crashes go to tests/fuzz/crashes/TARGET/ (kept: tests/fuzz/test_corpora.py replays them). Fresh
runs start from the committed minimized corpus tests/fuzz/corpus/TARGET plus ``starting_inputs``. After a
run, minimize into the committed corpus with libFuzzer's merge:

    python -m tests.fuzz.run TARGET --merge

Limits per input: 10 s of CPU time (guards.cpu_limit), -rss_limit_mb=2048, inputs of at most 1 KiB
(-max_len). Long runs are meant for `nice -n 19` in the background (docs/reliability.md, "Coverage-guided fuzzing").
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The names of tests/fuzz/targets.py TARGETS, here so that choosing one imports no vhdxfs module before
# atheris instruments them.
TARGET_NAMES = ("open", "log", "check", "repair", "locator", "nbd", "control")
# -timeout only as a backstop: tests/fuzz/guards.py cpu_limit bounds each input to 10 s of CPU time.
LIBFUZZER_DEFAULTS = ["-timeout=1800", "-report_slow_units=1800", "-rss_limit_mb=2048", "-max_len=1024",
                      "-print_final_stats=1", "-reload=0"]


def starting_inputs(target: str) -> list[bytes]:
    """Hand-made first inputs: each seed unpatched, and one of each patch kind (tests/fuzz/patches.py)."""
    from .seeds import NAMES

    if target == "nbd":
        import struct

        from vhdxfs.nbd import protocol as p

        opt = struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, 9) + struct.pack(">I", 3) + b"abc" + struct.pack(">H", 0)
        meta = struct.pack(">I", 0) + struct.pack(">I", 1) + struct.pack(">I", 15) + b"base:allocation"
        req = struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_READ, 1, 4096, 512)
        return [b"\x03" + bytes(4) + b"\x00" + opt, b"\x05" + bytes(4) + b"\x00"
                + struct.pack(">QII", p.IHAVEOPT, p.OPT_SET_META_CONTEXT, len(meta)) + meta,
                b"\xff\x00\x00\x00\x03\x01" + req]
    if target == "control":
        from vhdxfs.service import control_protocol as cp

        lines = [cp.request("status"), cp.request("merge", {"layer": "disk_1.avhdx", "image": "disk.raw"}, 7),
                 cp.request("resize", {"size": "10G", "shrink": True}, "r"), cp.request("checkpoint", {"name": 5}),
                 b'{"execute":"x","id":NaN}\n', b"[[[[[[[[\n", b"\xff\xfe\n" + b"a" * 200]
        return [bytes([60, 7, 1, 3, 64, 2, 9, 17, 5]) + line for line in lines] + [bytes(9) + b"".join(lines)]
    if target == "locator":
        from .patches import spans
        from .seeds import seeds

        seed = seeds().pick(0, ("child",))
        at, n = next((s[1], s[2]) for s in spans(seed) if s[0] == "parent locator")
        return [seed.data[at:at + n], b"\0" * 20]
    out = [bytes([i]) for i in range(len(NAMES))]
    out += [bytes([0, 2, 1, 68, 0, 5]), bytes([3, 4, 3, 0, 6, 2]), bytes([0, 5, 0, 1, 2, 0, 0, 0, 1, 0, 5, 4]),
            bytes([5, 0x0f, 8, 0x20, 0]), bytes([6, 7, 1]), bytes([2, 1, 9, 0, 0, 4, 1, 2, 3, 4])]
    return out


def seed_corpus(target: str, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    committed = HERE / "corpus" / target
    if committed.is_dir():
        for f in committed.iterdir():
            shutil.copy(f, directory / f.name)
    for i, data in enumerate(starting_inputs(target)):
        (directory / f"start-{i}").write_bytes(data)


def replay(target: str, paths: list[str]) -> int:
    from .targets import TARGETS

    fn, failures = TARGETS[target], 0
    for name in paths:
        path = Path(name)
        for f in sorted(path.iterdir()) if path.is_dir() else [path]:
            try:
                fn(f.read_bytes())
            except Exception as exc:  # noqa: BLE001 - reported per input, the replay goes on
                failures += 1
                print(f"{f}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1 if failures else 0


def fuzz(target: str, args: argparse.Namespace, extra: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["vhdxfs"]):
        from .targets import TARGETS
    from .guards import cpu_limit

    def fn(data: bytes) -> None:
        with cpu_limit():
            TARGETS[target](data)

    work = HERE / "work" / target
    crashes = HERE / "crashes" / target
    crashes.mkdir(parents=True, exist_ok=True)
    if not work.is_dir() or not any(work.iterdir()):
        seed_corpus(target, work)
    # libFuzzer runs argv[0] through the shell for -merge's inner processes: it must be a command.
    command = f"{sys.executable} -m tests.fuzz.run {target}"
    if any(a.startswith("-merge_inner") for a in extra):  # such an inner process: libFuzzer gave every flag
        atheris.Setup([command, *extra], fn)
        atheris.Fuzz()
        return
    argv = [command, *LIBFUZZER_DEFAULTS, f"-artifact_prefix={crashes}/", *extra]
    if args.runs:
        argv.append(f"-runs={args.runs}")
    if args.max_time:
        argv.append(f"-max_total_time={args.max_time}")
    if args.merge:
        minimized = HERE / "corpus" / target
        shutil.rmtree(minimized, ignore_errors=True)
        minimized.mkdir(parents=True)
        argv += ["-merge=1", str(minimized), str(work)]
    else:
        argv.append(str(work))
    atheris.Setup(argv, fn)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=TARGET_NAMES)
    parser.add_argument("--runs", type=int, help="stop after this many executions")
    parser.add_argument("--max-time", type=int, help="stop after this many seconds")
    parser.add_argument("--replay", nargs="+", metavar="PATH", help="run these inputs once each, without atheris")
    parser.add_argument("--seed-corpus", action="store_true", help="write the starting inputs into the work dir")
    parser.add_argument("--merge", action="store_true", help="minimize the work corpus into tests/fuzz/corpus")
    args, extra = parser.parse_known_args()
    if args.replay:
        return replay(args.target, args.replay)
    if args.seed_corpus:
        seed_corpus(args.target, HERE / "work" / args.target)
        return 0
    fuzz(args.target, args, [a for a in extra if a != "--"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
