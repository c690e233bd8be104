"""The layout rules of docs/ARCHITECTURE.md, checked on the source (issue 13): every module of
protein_performer/ and benchmarks/ fits in one head (<= 500 lines), no function is longer than 80 lines,
the package has no import cycle, and the layers only import downwards (cli -> analysis / training /
studies / recipes -> model / data). Pure ``ast``: nothing is imported or run."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "protein_performer"
BENCHMARKS = PACKAGE.parent / "benchmarks"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# lower layers never import upper ones; modules at the package root (errors, runtime) are below all,
# but pretrained (the checkpoint loader: model + tokenizer) sits with the layer that uses it
LAYERS = {
    "cli": 3,
    "studies": 2,
    "recipes": 2,
    "analysis": 2,
    "training": 2,
    "generation": 2,
    "pretrained": 2,
    "model": 1,
    "data": 1,
}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that ``name`` imports (anywhere in the file, functions included)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {  # ``if TYPE_CHECKING:`` imports never run
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` is an edge to the submodule; ``from mod import name`` one to mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body without its signature and docstring (the formatter spreads long
    signatures one argument per line; that is not code a reader has to hold)."""
    body = fn.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    return fn.end_lineno - body[0].lineno + 1


def sized_files() -> dict[str, Path]:
    """The files the size rules hold for: the package's modules and the benchmark scripts."""
    scripts = {f"benchmarks/{path.name}": path for path in sorted(BENCHMARKS.glob("*.py"))}
    assert "benchmarks/report.py" in scripts, BENCHMARKS
    return {**modules(), **scripts}


def test_modules_and_functions_fit_in_one_head():
    too_long, long_functions = [], []
    for name, path in sized_files().items():
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = body_lines(node)
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long
    assert not long_functions, long_functions


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first walk, as the cycle it closes."""
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycle():
    """A package and its own submodules import each other by design (re-exports), so those edges
    are left out; any other cycle fails."""
    edges = {
        name: {t for t in targets if not t.startswith(name + ".") and not name.startswith(t + ".")}
        for name, targets in graph().items()
    }
    assert not find_cycles(edges), find_cycles(edges)


def layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_layers_import_only_downwards():
    upward = []
    for name, targets in graph().items():
        here = layer(name)
        for target in targets:
            there = layer(target)
            if here is not None and there is not None and there > here:
                upward.append(f"{name} -> {target}")
            if here is None and there is not None and name.count(".") == 1 and name != "protein_performer.__init__":
                # root modules (errors, runtime) sit below every layer; the `python -m` hooks run cli
                if name.split(".")[1] not in {
                    "ingest",
                    "train",
                    "export_attention",
                    "contacts",
                    "aa_similarity",
                    "predict_contacts",
                    "embed",
                    "demo",
                    "family_contacts",
                }:
                    upward.append(f"{name} -> {target}")
    assert not upward, upward


def test_the_checks_see_a_violation(tmp_path):
    """The cycle finder and the size check are not vacuous: they flag a planted cycle and a long function."""
    names = {
        "protein_performer.model.a": "from protein_performer.model import b\n",
        "protein_performer.model.b": "import protein_performer.model.a\n",
    }
    known = set(names) | {"protein_performer.model"}
    paths = {}
    for name, text in names.items():
        paths[name] = tmp_path / (name.rsplit(".", 1)[1] + ".py")
        paths[name].write_text(text)
    assert imports("protein_performer.model.a", paths["protein_performer.model.a"], known) == {
        "protein_performer.model.b"
    }
    assert imports("protein_performer.model.b", paths["protein_performer.model.b"], known) == {
        "protein_performer.model.a"
    }
    edges = {name: imports(name, paths[name], known) for name in names}
    assert find_cycles(edges) == [
        ["protein_performer.model.a", "protein_performer.model.b", "protein_performer.model.a"]
    ]
    body = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    fn = ast.parse(body).body[0]
    assert (
        body_lines(fn) == MAX_FUNCTION_LINES + 0
        and body_lines(ast.parse(body + "    x = 2\n").body[0]) > MAX_FUNCTION_LINES
    )
