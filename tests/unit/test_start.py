"""Fast start: a command imports only what it runs (docs/commands.md, "Start-up", has the timings). The modules are
checked, not the time: `vhdxfs --help` loads no command, `info`, `check` and `map` load neither trio nor
FUSE nor the machinery behind package metadata."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import make_image

HEAVY = ("trio", "pyfuse3", "tqdm", "importlib.metadata", "vhdxfs.mount", "vhdxfs.nbd", "vhdxfs.engine.aio",
         "ssl", "asyncio")


def modules_after(*argv: str) -> set[str]:
    code = ("import sys\nfrom vhdxfs.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('\\n'.join(sorted(sys.modules)), file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    return set(result.stderr.split())


def loaded(modules: set[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


@pytest.mark.parametrize("command", ["info", "check", "map"])
def test_offline_commands_load_no_daemon_machinery(tmp_path, command):
    image = make_image(tmp_path / "d.vhdx", 1 << 20)
    modules = modules_after(command, str(image))
    assert "vhdxfs.engine" in modules  # the command really ran
    assert [name for name in HEAVY if loaded(modules, name)] == []


def test_help_loads_no_command_at_all():
    modules = modules_after("--help")
    assert not loaded(modules, "vhdxfs.engine") and not loaded(modules, "vhdxfs.tools")
    assert [name for name in HEAVY if loaded(modules, name)] == []


def test_every_command_help_line_matches_its_parser():
    """cli.COMMANDS repeats each command's one-line help so --help needs no import: they must not drift."""
    from vhdxfs import cli

    full = " ".join(cli.build_parser(full=True).format_help().split())
    lazy = " ".join(cli.build_parser([]).format_help().split())
    assert full == lazy
    for name, _module, help_text in cli.COMMANDS:
        assert f"{name} {help_text}" in full
