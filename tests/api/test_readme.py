"""The README's "Python API" examples run as written (in a scratch directory)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def examples() -> list[str]:
    text = README.read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_has_examples():
    assert len(examples()) >= 2


def test_the_readme_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for code in examples():
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})  # noqa: S102
    assert (tmp_path / "flat.raw").stat().st_size == 64 << 20
    out = capsys.readouterr().out
    assert "DATA new.vhdx" in out and "HOLE new.vhdx" in out
