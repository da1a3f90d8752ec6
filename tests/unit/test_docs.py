"""The manual pages and the bash completion are generated from the argparse definitions
(packaging/make_docs.py); the committed files must be what the generators make of today's parsers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "packaging" / "make_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_docs_are_up_to_date():
    stale = [str(path.relative_to(ROOT)) for path, text in load_make_docs().outputs().items()
             if not path.exists() or path.read_text() != text]
    assert not stale, f"stale: {stale}; run .venv/bin/python packaging/make_docs.py"


def test_the_man_page_documents_every_command_and_option():
    page = (ROOT / "packaging" / "man" / "vhdxfs.1").read_text().replace("\\-", "-")
    for word in ("mount", "umount", "serve", "stop", "create", "info", "check", "map", "convert", "compact",
                 "resize", "commit", "--tls-cert", "--insecure-no-tls", "--repair", "--shrink"):
        assert word in page


def test_setup_installs_the_man_pages_and_the_completion():
    from tests.helpers import need_tools, run

    need_tools("man")
    for page in ("vhdxfs", "mount.fuse.vhdxfs"):
        found = run("man", "-w", page)
        assert found.returncode == 0 and found.stdout.strip(), f"man -w {page}: {found.stderr}"
    completion = Path("/usr/local/share/bash-completion/completions/vhdxfs")
    assert completion.read_text() == (ROOT / "packaging" / "completion" / "vhdxfs").read_text()
    listed = run("bash", "-c", f"source {completion}; complete -p vhdxfs")
    assert listed.returncode == 0 and "vhdxfs" in listed.stdout
