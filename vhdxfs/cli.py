"""Entry point: argument parsing, one-line errors, exit codes.

Each subcommand lives in its own module that offers ``register(subparsers)``; the parser it adds sets
``func`` to a callable taking the parsed arguments and returning an exit code. Errors leave as one line
``vhdxfs: <file>: <what is wrong>`` with exit status 1; ``--debug`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback

from . import __version__
from .errors import VhdxError

# Every command, in the order --help lists them: (name, the module whose register() adds it, one-line help).
# Only the module of the command being run is imported, so `vhdxfs info` never loads trio or FUSE, and
# `vhdxfs --help` loads no command module at all (docs/commands.md, "Start-up").
COMMANDS = (
    ("mount", "vhdxfs.mount.command", "mount images as raw files"),
    ("umount", "vhdxfs.mount.command", "unmount, after every image is flushed and closed"),
    ("serve", "vhdxfs.nbd.command", "serve images over NBD"),
    ("stop", "vhdxfs.nbd.command", "stop an NBD server, after every image is flushed and closed"),
    ("status", "vhdxfs.tools.live", "show what a running disk does"),
    ("checkpoint", "vhdxfs.tools.live", "freeze a running disk; it goes on in a new child"),
    ("checkpoints", "vhdxfs.tools.live", "list the chain of a running disk"),
    ("merge", "vhdxfs.tools.live", "merge a checkpoint layer of a running disk into its parent"),
    ("create", "vhdxfs.tools.create", "create a new VHDX image"),
    ("info", "vhdxfs.tools.info", "show what an image is"),
    ("check", "vhdxfs.tools.check", "check an image for consistency (and repair it)"),
    ("map", "vhdxfs.tools.map", "show which ranges of the disk hold data"),
    ("convert", "vhdxfs.tools.convert", "convert raw <-> VHDX"),
    ("compact", "vhdxfs.tools.compact", "give the space of all-zero blocks back to the host"),
    ("resize", "vhdxfs.tools.resize", "change the virtual size of an image"),
    ("commit", "vhdxfs.tools.commit", "merge a differencing child into its parent"),
)


def _chosen(argv: list[str]) -> str | None:
    """The command named on the command line (the first argument that is one), if any."""
    names = {name for name, _module, _help in COMMANDS}
    return next((a for a in argv if a in names), None)


def build_parser(argv: list[str] | None = None, *, full: bool = False) -> argparse.ArgumentParser:
    """The parser; with ``full`` (or for the command in ``argv``) each command's own arguments, else only
    its name and help line."""
    parser = argparse.ArgumentParser(
        prog="vhdxfs",
        description="VHDX virtual disks as raw files: mount them through FUSE, serve them over NBD, and work on "
                    "images offline.",
    )
    parser.add_argument("--version", action="version", version=f"vhdxfs {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and request traces")
    s3 = parser.add_argument_group("images in an S3 store (s3://BUCKET/KEY; docs/s3.md)")
    s3.add_argument("--s3-endpoint", metavar="URL", help="the store's endpoint, for S3-compatible stores "
                    "(default: $AWS_ENDPOINT_URL, else AWS)")
    s3.add_argument("--s3-profile", metavar="NAME", help="the profile of the shared credentials and config files "
                    "(default: $AWS_PROFILE, else default)")
    s3.add_argument("--s3-cache-dir", metavar="DIR", help="keep fetched pages in DIR too, across runs "
                    "(default: memory only)")
    s3.add_argument("--s3-cache-size", metavar="SIZE", help="bytes of pages kept in --s3-cache-dir, per image "
                    "(default 4G)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = None if full else _chosen(sys.argv[1:] if argv is None else argv)
    modules = [m for _n, m, _h in COMMANDS] if full else [m for n, m, _h in COMMANDS if n == chosen]
    for module in dict.fromkeys(modules):
        importlib.import_module(module).register(subparsers)
    for name, _module, help_text in COMMANDS:
        if name not in subparsers.choices:
            subparsers.add_parser(name, help=help_text)
    return parser


def _error_prefix() -> str:
    """``vhdxfs: `` on a terminal or in a file; under systemd, where journald names us already, the error
    priority instead (a failed start then shows once, as an error: service/logs.py)."""
    from .service.logs import stderr_is_journal

    return "<3>" if stderr_is_journal() else "vhdxfs: "


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    _s3_settings(args)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so a reader gone early is met below, not at the interpreter's exit
        return code
    except BrokenPipeError:
        return _reader_gone()
    except VhdxError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{_error_prefix()}{exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vhdxfs: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{_error_prefix()}{where}{exc.strerror or exc}", file=sys.stderr)
        return 1


def _s3_settings(args: argparse.Namespace) -> None:
    """The S3 options, as the environment that the S3 client (and a daemon started from here) reads."""
    for option, variable in (("s3_endpoint", "AWS_ENDPOINT_URL"), ("s3_profile", "AWS_PROFILE"),
                             ("s3_cache_dir", "VHDXFS_S3_CACHE_DIR"), ("s3_cache_size", "VHDXFS_S3_CACHE_SIZE")):
        value = getattr(args, option, None)
        if value:
            os.environ[variable] = os.path.abspath(value) if option == "s3_cache_dir" else value


def _reader_gone() -> int:
    """The reader of our output closed the pipe (`vhdxfs map IMAGE | head`): stop quietly, as a command killed
    by SIGPIPE would, with what is still buffered for stdout dropped rather than failing at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def mount_helper() -> int:
    """`mount.fuse.vhdxfs SOURCE TARGET -o OPTIONS`, as mount(8) runs it for fstab entries (mount/fstab.py)."""
    from .mount.fstab import translate

    return main(translate(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
