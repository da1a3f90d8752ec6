"""The one entry point of the benchmark scripts: `python benchmarks/main.py fuse|nbd|side-by-side|convert [OPTIONS]`.

benchmarks/run, run-nbd, run-side-by-side and run-convert set up the venv and come here. A file outside the package,
so that `harness` is imported as a package (relative imports, no module of ours at the top of sys.path
but this one and `harness`) without changing the working directory the options' paths are relative to.
"""

from __future__ import annotations

import sys
from importlib import import_module

FRONT_ENDS = {"fuse": "harness.fuse", "nbd": "harness.nbd", "side-by-side": "harness.side_by_side",
              "chain": "harness.chain", "live": "harness.live", "convert": "harness.convert", "s3": "harness.s3"}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in FRONT_ENDS:
        print(f"usage: {sys.argv[0]} {{{','.join(FRONT_ENDS)}}} [OPTIONS] (or benchmarks/run, run-nbd, "
              "run-side-by-side, run-convert)", file=sys.stderr)
        return 2
    module = import_module(FRONT_ENDS[sys.argv.pop(1)])
    return int(module.main())


if __name__ == "__main__":
    sys.exit(main())
