"""The README's Python examples run as written (in a scratch directory): every ```python block of README.md,
in order. The "Python API" section holds them; its examples must be there to be run."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def examples() -> list[str]:
    return python_blocks(README.read_text())


def test_the_readme_has_examples():
    text = README.read_text()
    assert "\n## Python API\n" in text, "the README's Python API section is gone"
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    assert len(python_blocks(section)) >= 2
    assert any("vhdxfs.open(" in code for code in examples()) and any("open_async" in code for code in examples())


def test_the_readme_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for code in examples():
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})  # noqa: S102
    assert (tmp_path / "flat.raw").stat().st_size == 64 << 20
    out = capsys.readouterr().out
    assert "DATA new.vhdx" in out and "HOLE new.vhdx" in out
