"""The documentation. The manual pages and the bash completion are generated from the argparse definitions
(packaging/make_docs.py); the committed files must be what the generators make of today's parsers. The
README is a landing page of at most README_MAX_LINES lines; the rest is in docs/, and every relative link
of README.md and docs/*.md points at a file that exists (and, with a #fragment, at a heading of it)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_MAX_LINES = 250


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


# -- README and docs/ --------------------------------------------------------------------------------------
def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def blank(match: re.Match[str]) -> str:
    return "\n" * match.group(0).count("\n")


def without_blocks(text: str) -> str:
    """The text without fenced code blocks and HTML comments; line numbers are kept."""
    text = re.sub(r"^```.*?^```[^\n]*$", blank, text, flags=re.S | re.M)
    return re.sub(r"<!--.*?-->", blank, text, flags=re.S)


def prose(text: str) -> str:
    """The text without fenced code blocks, HTML comments and inline code; line numbers are kept."""
    return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", blank, without_blocks(text), flags=re.S)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: link text only, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a file's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.*?)[ \t#]*$", without_blocks(path.read_text()), flags=re.M):
        base = anchor(heading)
        name, n = base, 0
        while name in found:
            n += 1
            name = f"{base}-{n}"
        found.add(name)
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every inline link and link reference definition, outside code."""
    text = prose(path.read_text())
    matches = [*re.finditer(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text),
               *re.finditer(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)", text, flags=re.M)]
    return sorted((text.count("\n", 0, match.start()) + 1, match.group(1)) for match in matches)


def test_the_readme_is_a_landing_page():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, "README.md is the landing page: move the details to docs/"
    assert "./run-tests" in text, "CI runs the README's test command"
    assert "stack" in anchors(README), "the README keeps its Stack section"


def test_every_page_of_the_docs_is_linked_from_the_readme():
    linked = {(README.parent / unquote(target.split("#")[0])).resolve() for _, target in links(README)}
    unlinked = [path.name for path in markdown_files()[1:] if path.resolve() not in linked]
    assert not unlinked, f"docs/ pages the README does not link: {unlinked}"


def test_every_relative_link_points_at_a_file_and_heading_that_exist():
    broken = []
    checked = 0
    for path in markdown_files():
        for line, target in links(path):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):  # https:, mailto:, ...: not ours to check
                continue
            checked += 1
            file, _, fragment = target.partition("#")
            where = (path.parent / unquote(file)).resolve() if file else path
            if not where.exists():
                broken.append(f"{path.relative_to(ROOT)}:{line}: {target}: no such file")
            elif fragment and where.suffix == ".md" and unquote(fragment) not in anchors(where):
                broken.append(f"{path.relative_to(ROOT)}:{line}: {target}: no such heading in {where.name}")
    assert checked >= len(markdown_files()), "the link checker found (almost) no links: is it still reading them?"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_checker_reads_links_and_anchors_as_github_does(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Header updates (2.2.2, 2.2.2.1)\n## 4 KiB writes: where the time goes\n## Last run\n## Last run\n"
        "## `vhdxfs check`\n"
        "See [a](other.md#x) and [b\nc](#last-run-1), `[not](code.md)`, <!-- [nor](comment.md) -->\n"
        "```\n[nor this](block.md)\n```\n[ref]: ref.md\n"
    )
    assert anchors(page) == {"header-updates-222-2221", "4-kib-writes-where-the-time-goes", "last-run",
                             "last-run-1", "vhdxfs-check"}
    assert links(page) == [(6, "other.md#x"), (7, "#last-run-1"), (11, "ref.md")]
