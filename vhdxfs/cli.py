"""Entry point: argument parsing, one-line errors, exit codes.

Each subcommand lives in its own module that offers ``register(subparsers)``; the parser it adds sets
``func`` to a callable taking the parsed arguments and returning an exit code. Errors leave as one line
``vhdxfs: <file>: <what is wrong>`` with exit status 1; ``--debug`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from . import __version__
from .errors import VhdxError

# Modules that add subcommands, in the order --help lists them.
_COMMAND_MODULES = (
    "vhdxfs.mount.command",
    "vhdxfs.nbd.command",
    "vhdxfs.tools.create",
    "vhdxfs.tools.info",
    "vhdxfs.tools.check",
    "vhdxfs.tools.convert",
    "vhdxfs.tools.compact",
    "vhdxfs.tools.resize",
    "vhdxfs.tools.commit",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhdxfs",
        description="Present VHDX virtual disks as raw files through FUSE, and work on VHDX images offline.",
    )
    parser.add_argument("--version", action="version", version=f"vhdxfs {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and request traces")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VhdxError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"vhdxfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vhdxfs: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"vhdxfs: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


def mount_helper() -> int:
    """`mount.fuse.vhdxfs SOURCE TARGET -o OPTIONS`, as mount(8) runs it for fstab entries (mount/fstab.py)."""
    from .mount.fstab import translate

    return main(translate(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
