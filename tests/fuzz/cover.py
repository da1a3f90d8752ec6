"""Line coverage of vhdxfs/format/ and vhdxfs/engine/ when the fuzz corpora are replayed (coverage.py).

    python -m tests.fuzz.cover [TARGET...] [--corpus DIR]     # default: every target, then all together

Each target's committed corpus (tests/fuzz/corpus/TARGET, or DIR/TARGET) is replayed in a fresh process
under coverage.py, so one target's imports do not count for another; "all" replays every corpus in one.
Needs the coverage package (not part of the test extra: only these figures use it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOURCES = ["vhdxfs/format", "vhdxfs/engine"]
TARGET_NAMES = ("open", "log", "check", "repair", "locator", "nbd")


def _measure(targets: list[str], corpus: Path) -> dict[str, float]:
    """Replay ``targets`` in a child process under coverage; percent of lines per source directory."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "cov"
        dirs = [(t, str(corpus / t)) for t in targets if (corpus / t).is_dir()]
        script = f"from tests.fuzz.run import replay\nfor t, d in {dirs!r}:\n    replay(t, [d])\n"
        runner = Path(tmp) / "replay.py"
        runner.write_text(script)
        subprocess.run([sys.executable, "-m", "coverage", "run", f"--data-file={data}",
                        "--source=" + ",".join(SOURCES), str(runner)], cwd=ROOT, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        out = Path(tmp) / "cov.json"
        subprocess.run([sys.executable, "-m", "coverage", "json", f"--data-file={data}", "-o", str(out), "-q"],
                       cwd=ROOT, check=True)
        files = json.loads(out.read_text())["files"]
    result = {}
    for source in [*SOURCES, "both"]:
        chosen = [f for name, f in files.items() if source == "both" or name.startswith(source)]
        lines = sum(f["summary"]["num_statements"] for f in chosen)
        covered = sum(f["summary"]["covered_lines"] for f in chosen)
        result[source] = round(100 * covered / max(1, lines), 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.cover")
    parser.add_argument("targets", nargs="*", default=[*TARGET_NAMES, "all"])
    parser.add_argument("--corpus", type=Path, default=HERE / "corpus")
    args = parser.parse_args()
    for target in args.targets:
        chosen = list(TARGET_NAMES) if target == "all" else [target]
        print(target, json.dumps(_measure(chosen, args.corpus.resolve())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
