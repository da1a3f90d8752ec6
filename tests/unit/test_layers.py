"""The shape of vhdxfs as tests: layers, the direction of imports, the engine's public face, file sizes.

docs/design.md ("Layers") explains the rules. Imports are read from the source with ``ast``, so a module
need not be importable to be checked. ``import X``, ``from X import Y`` and relative imports all count,
wherever they stand (inside functions and ``if TYPE_CHECKING:`` blocks too). ``importlib.import_module``
calls are not followed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path

# The only engine modules a front end may import.
PUBLIC_ENGINE = {"vhdxfs.engine", "vhdxfs.engine.aio", "vhdxfs.engine.live"}

# The layers, bottom to top. The engine is five of them: the image file (structures, host I/O), the virtual
# disk (translation, allocation, guards, flush: the core's contract), then on it the trio driver and the
# offline operations side by side (neither imports the other), the live operations on a running disk (on
# both), and the package's public face.
FORMAT, IMAGE, DISK, DRIVERS, LIVE, ENGINE_API, FRONT_END, ENTRY = range(8)
LAYER_NAMES = ["format", "engine: image", "engine: disk", "engine: aio and ops", "engine: live",
               "engine: public API", "front end", "entry"]
SIDE_BY_SIDE = ["vhdxfs.engine.aio", "vhdxfs.engine.ops"]  # one layer, and neither imports the other

# A module belongs to the layer of the most specific package (or module) listed here that contains it.
LAYERS = {
    "vhdxfs.errors": FORMAT,
    "vhdxfs.sizes": FORMAT,
    "vhdxfs.format": FORMAT,
    "vhdxfs.service": FORMAT,  # daemon plumbing (fork, pid records, logs, systemd): knows no image
    "vhdxfs.engine.image": IMAGE,
    "vhdxfs.engine.disk": DISK,
    "vhdxfs.engine.aio": DRIVERS,
    "vhdxfs.engine.ops": DRIVERS,
    "vhdxfs.engine.live": LIVE,
    "vhdxfs.engine": ENGINE_API,  # vhdxfs/engine/__init__.py alone: every engine module is in a sub-package
    "vhdxfs.mount": FRONT_END,
    "vhdxfs.tools": FRONT_END,
    "vhdxfs.nbd": FRONT_END,
    "vhdxfs.api": FRONT_END,
    "vhdxfs.cli": ENTRY,
    "vhdxfs.__main__": ENTRY,
}
TOP_PACKAGE_LAYER = ENTRY  # vhdxfs/__init__.py alone: a new top-level module has no layer until LAYERS names it
FRONT_END_PACKAGES = [name for name, level in LAYERS.items() if level == FRONT_END]

MAX_TOOLS_FORMAT_IMPORTS = 8  # import statements in vhdxfs/tools that take from vhdxfs.format
MAX_LINES = 300

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vhdxfs"


# -- reading the source -------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Import:
    """One module named by one import statement."""

    path: Path
    line: int
    source: str  # the importing module
    target: str  # the imported module: a vhdxfs module, or an outside name such as "trio"
    statement: str  # the statement, on one line

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.source} imports {self.target}  [{self.statement}]"


@cache
def modules() -> dict[str, Path]:
    """Every module of vhdxfs by its dotted name (a package by the name of its __init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of the module ``from <level dots><name> import ...`` reads, written in ``module``."""
    if level == 0:
        return name or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join([*base, name] if name else base)


@cache
def imports() -> tuple[Import, ...]:
    """Every import in vhdxfs. ``from P import M`` names the submodule P.M when there is one, else P."""
    found = []
    for module, path in modules().items():
        text = path.read_text()
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = absolute(module, path.name == "__init__.py", node.level, node.module)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules() else base
                           for alias in node.names]
            else:
                continue
            statement = " ".join(ast.get_source_segment(text, node).split())
            found.extend(Import(path, node.lineno, module, target, statement) for target in dict.fromkeys(targets))
    return tuple(sorted(found))


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def internal_imports() -> list[Import]:
    return [i for i in imports() if in_package(i.target, "vhdxfs")]


def layer(module: str) -> int | None:
    """The layer of ``module``, None when LAYERS does not place it."""
    if module == "vhdxfs":
        return TOP_PACKAGE_LAYER
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def front_end(module: str) -> str | None:
    """The front end package ``module`` belongs to, if any."""
    return next((p for p in FRONT_END_PACKAGES if in_package(module, p)), None)


def listing(found: list) -> str:
    return "\n".join(f"  {item}" for item in found)


# -- the import graph ---------------------------------------------------------------------------------------
def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {module: set() for module in modules()}
    for i in internal_imports():
        if i.target in modules():
            graph[i.source].add(i.target)
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Modules reached from ``start`` by one import or more (``start`` itself only through a cycle)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def shortest_cycle(graph: dict[str, set[str]], start: str) -> list[str]:
    """The shortest chain of imports from ``start`` back to itself: [start, ..., start]."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while start not in came_from:
        current = queue.popleft()
        for nxt in sorted(graph[current]):
            if nxt not in came_from:
                came_from[nxt] = current
                queue.append(nxt)
    cycle = [start]
    node = came_from[start]
    while node != start:
        cycle.append(node)
        node = came_from[node]
    cycle.append(start)
    return cycle[::-1]


# -- the rules ----------------------------------------------------------------------------------------------
def test_every_module_belongs_to_a_layer():
    unplaced = [f"{path.relative_to(ROOT)} ({module})" for module, path in modules().items() if layer(module) is None]
    assert not unplaced, "modules in no layer (add their package to LAYERS and docs/design.md):\n" + listing(unplaced)


def test_no_import_cycles():
    graph = import_graph()
    reach = {module: reachable(graph, module) for module in graph}
    reported: set[str] = set()
    problems = []
    for module in sorted(graph):
        if module in reach[module] and module not in reported:
            reported |= {other for other in reach[module] if module in reach[other]}
            cycle = shortest_cycle(graph, module)
            edges = [next(i for i in internal_imports() if (i.source, i.target) == pair)
                     for pair in pairwise(cycle)]
            problems.append(" -> ".join(cycle) + "\n" + listing(edges))
    assert not problems, "import cycles:\n" + "\n".join(problems)


def test_imports_point_down():
    upward = [f"{i}  ({LAYER_NAMES[layer(i.source)]} -> {LAYER_NAMES[layer(i.target)]})"
              for i in internal_imports()
              if None not in (layer(i.source), layer(i.target)) and layer(i.target) > layer(i.source)]
    assert not upward, "imports pointing up a layer:\n" + listing(upward)


def test_every_engine_module_is_in_a_sub_package():
    loose = [name for name in modules() if in_package(name, "vhdxfs.engine") and name.count(".") == 2
             and name not in LAYERS]
    assert not loose, "engine modules outside image/, disk/, aio/, ops/, live/:\n" + listing(loose)


def test_the_trio_driver_and_the_offline_operations_do_not_import_each_other():
    wrong = [i for i in internal_imports() for a, b in (SIDE_BY_SIDE, SIDE_BY_SIDE[::-1])
             if in_package(i.source, a) and in_package(i.target, b)]
    assert not wrong, "imports between vhdxfs.engine.aio and vhdxfs.engine.ops:\n" + listing(wrong)


def test_format_does_not_import_the_engine():
    wrong = [i for i in internal_imports()
             if in_package(i.source, "vhdxfs.format") and in_package(i.target, "vhdxfs.engine")]
    assert not wrong, "vhdxfs.format imports the engine:\n" + listing(wrong)


def test_front_ends_do_not_import_each_other():
    wrong = [i for i in internal_imports()
             if front_end(i.source) and front_end(i.target) not in (None, front_end(i.source))]
    assert not wrong, "front ends importing another front end:\n" + listing(wrong)


def test_front_ends_use_only_the_public_engine():
    wrong = [i for i in internal_imports()
             if layer(i.source) == FRONT_END and in_package(i.target, "vhdxfs.engine")
             and i.target not in PUBLIC_ENGINE]
    assert not wrong, f"front ends importing engine modules other than {sorted(PUBLIC_ENGINE)}:\n" + listing(wrong)


def test_tools_take_little_from_format():
    statements = sorted({(i.path, i.line, i.statement): i for i in internal_imports()
                         if in_package(i.source, "vhdxfs.tools") and in_package(i.target, "vhdxfs.format")}.values())
    assert len(statements) <= MAX_TOOLS_FORMAT_IMPORTS, (
        f"{len(statements)} import statements in vhdxfs/tools take from vhdxfs.format, at most "
        f"{MAX_TOOLS_FORMAT_IMPORTS} may:\n" + listing(statements))


def test_no_file_is_longer_than_the_limit():
    long = [f"{path.relative_to(ROOT)}: {n} lines" for path in modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, f"files longer than {MAX_LINES} lines:\n" + listing(long)


def test_engine_core_does_not_import_trio():
    result = subprocess.run([sys.executable, "-c", "import sys, vhdxfs.engine; print('trio' in sys.modules)"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    reached = {"vhdxfs.engine"} | reachable(import_graph(), "vhdxfs.engine")
    culprits = [i for i in imports() if i.source in reached and in_package(i.target, "trio")]
    assert result.stdout.strip() == "False", (
        "import vhdxfs.engine loads trio; the modules it reaches that import trio:\n" + listing(culprits))
