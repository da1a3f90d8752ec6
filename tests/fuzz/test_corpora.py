"""Replay the fuzzers' minimized corpora and every crash they found, without atheris.

Each file of tests/fuzz/corpus/TARGET/ and tests/fuzz/crashes/TARGET/ goes through the same target
function the fuzzer ran (tests/fuzz/targets.py), within the per-input bounds of tests/fuzz/guards.py.
The long coverage-guided runs are tests/fuzz/run.py's (docs/reliability.md, "Coverage-guided fuzzing").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.guards import ReadOnlyMemory, WroteReadOnly, bounded
from tests.fuzz.run import TARGET_NAMES, starting_inputs
from tests.fuzz.targets import TARGETS

HERE = Path(__file__).resolve().parent


def _inputs(kind: str) -> list[Path]:
    return sorted(p for t in TARGET_NAMES for p in (HERE / kind / t).glob("*") if p.is_file())


def _id(path: Path) -> str:
    return f"{path.parent.name}/{path.name[:16]}"


def test_every_target_has_a_corpus():
    for target in TARGET_NAMES:
        assert any((HERE / "corpus" / target).glob("*")), f"no corpus for {target}"


@pytest.mark.parametrize("path", _inputs("corpus"), ids=_id)
def test_corpus_input(path: Path) -> None:
    with bounded():
        TARGETS[path.parent.name](path.read_bytes())


@pytest.mark.parametrize("path", _inputs("crashes"), ids=_id)
def test_crash_input_is_fixed(path: Path) -> None:
    with bounded():
        TARGETS[path.parent.name](path.read_bytes())


@pytest.mark.parametrize("target", TARGET_NAMES)
def test_starting_inputs(target: str) -> None:
    for data in starting_inputs(target):
        with bounded():
            TARGETS[target](data)


def test_read_only_memory_refuses_every_change() -> None:
    host = ReadOnlyMemory(b"abc", "x")
    for call in (lambda: host.pwrite(0, b"z"), lambda: host.truncate(1), lambda: host.punch_hole(0, 1),
                 lambda: host.write_zeros(0, 1)):
        with pytest.raises(WroteReadOnly):
            call()
    assert host.pread(0, 4) == b"abc\0"


def test_patches_get_past_the_checksums_and_are_undone() -> None:
    """A patched header is re-sealed (it still decodes), and the next input starts from the clean seed."""
    from tests.fuzz.patches import HEADERS, Reader, apply
    from tests.fuzz.seeds import seeds
    from vhdxfs.format.header import Header

    seed = seeds().pick(0)
    patched = apply(seed, Reader(bytes([2, 1, 8, 0, 7])))  # header 1: SequenceNumber's low byte := 0xff
    header = Header.decode(bytes(patched[HEADERS[0]:HEADERS[0] + 4096]))
    assert header is not None and header.sequence_number % 256 == 0xFF
    assert apply(seed, Reader(b"")) == seed.data
