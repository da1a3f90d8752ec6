"""Generate vhdxfs(1), mount.fuse.vhdxfs(8) and the bash completion from the argparse definitions.

    .venv/bin/python packaging/make_docs.py          # rewrite packaging/man/* and packaging/completion/*

The files are committed, so a machine without these generators installs them as they are (setup.sh);
tests/unit/test_docs.py fails when they are stale (an option added without running this). The man pages
come from argparse-manpage, the completion from shtab: well-kept generators, nothing written by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DATE = "2026-11-25"  # fixed, so the output depends only on the parsers
URL = "README.md in the vhdxfs source tree"


def manpage(parser, section: int, description: str) -> str:
    from argparse_manpage.manpage import Manpage

    from vhdxfs import __version__

    page = Manpage(parser, format="pretty")
    page.date, page.section, page.manual = DATE, section, "vhdxfs manual"
    page.source = f"vhdxfs {__version__}"
    page.description = description
    return str(page)


def outputs() -> dict[Path, str]:
    """Every generated file and its contents."""
    import shtab

    from vhdxfs.cli import build_parser
    from vhdxfs.mount.fstab import parser as fstab_parser

    cli = build_parser(full=True)
    return {
        HERE / "man" / "vhdxfs.1": manpage(cli, 1, "VHDX virtual disks as raw files: FUSE mount, NBD server, "
                                                   "offline tools"),
        HERE / "man" / "mount.fuse.vhdxfs.8": manpage(fstab_parser(), 8, "mount(8) helper for fuse.vhdxfs "
                                                                         "entries in /etc/fstab"),
        HERE / "completion" / "vhdxfs": shtab.complete(cli, shell="bash"),
    }


def main() -> int:
    for path, text in outputs().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
