"""The package's layering, read from the source: no import cycle, and imports only go down.

    cli/ and the `python -m protein_performer.<cmd>` shims   ->   analysis/, training/, experiments/
    ->   model/ (and generation.py), data/   ->   errors.py, runtime.py

Only imports that run when a module is imported count: imports inside functions (lazy, optional
backends) and under ``if TYPE_CHECKING:`` do not make a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "protein_performer"
LAYERS = {"errors": 0, "runtime": 0, "data": 1, "model": 1, "generation": 1, "conf": 1,
          "analysis": 2, "training": 2, "experiments": 2, "cli": 3}
SHIM_LAYER = 3  # the other top-level modules are the old entry-point paths, thin shims over cli/


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_targets(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """The package modules that importing ``path`` imports (at module level, classes included)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                submodules = {f"{target}.{a.name}" for a in node.names} & modules
                found.update(submodules)
                if len(submodules) < len(node.names) and target in modules:
                    found.add(target)  # names defined in the module itself, not submodules
            elif isinstance(node, ast.If) and not is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, (ast.With, ast.ClassDef)):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    return found - {name}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    return {name: import_time_targets(path, set(paths), root) for name, path in paths.items()}


def layer(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) == 1:
        return None  # the package itself
    return LAYERS.get(parts[1], SHIM_LAYER)


def test_graph_sees_the_known_edges():
    graph = import_graph()
    assert "protein_performer.model.favor.module" in graph["protein_performer.model.favor"]
    assert "protein_performer.cli.train" in graph["protein_performer.train"]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    return cycles


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if layer(a) is not None and layer(b) is not None and layer(b) > layer(a))


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_only_go_down():
    upward = upward_imports(import_graph())
    assert not upward, "imports against the layering: " + "; ".join(upward)


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    root = tmp_path / "protein_performer"
    files = {
        "__init__.py": "",
        "data/__init__.py": "",
        "data/reader.py": "from protein_performer.analysis import report\n",  # upward: data -> analysis
        "analysis/__init__.py": "",
        "analysis/report.py": "from . import maps\n",
        "analysis/maps.py": "import protein_performer.analysis.report\n",  # cycle report <-> maps
        "analysis/lazy.py": "def f():\n    from protein_performer.cli import main\n",  # inside a function: fine
        "cli/__init__.py": "",
        "cli/main.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from protein_performer.data import reader\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = import_graph(root)
    assert graph["protein_performer.cli.main"] == set() and graph["protein_performer.analysis.lazy"] == set()
    cycles = find_cycles(graph)
    assert len(cycles) == 1 and set(cycles[0]) == {"protein_performer.analysis.report", "protein_performer.analysis.maps"}
    assert upward_imports(graph) == ["protein_performer.data.reader -> protein_performer.analysis.report"]
