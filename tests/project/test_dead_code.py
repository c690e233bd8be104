"""No dead code (issue 19): every function and class defined at the top level of a module of
protein_performer/ has a user outside tests/: a line of the package (its own module included),
the benchmarks, the notebooks, the configs (``_target_``), the docs or the Makefile / pyproject
(console scripts). A name only tests call is dead library code: delete it, or use it. Pure text and
``ast``: nothing is imported."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "protein_performer"
USERS = ["protein_performer/**/*.py", "benchmarks/**/*.py", "notebooks/*.ipynb", "conf/**/*.yaml", "docs/*.md"]
USERS_FILES = ["README.md", "Makefile", "pyproject.toml"]
# test oracles that live in the package on purpose (like flash-linear-attention's naive.py): the plain-tensor
# FAVOR+ from the paper's equations, which the kernels are checked against
ORACLES = {"model/favor/reference.py"}


def definitions() -> list[tuple[Path, int, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.append((path, node.lineno, node.name))
    return out


def word_counts() -> Counter:
    """How often each identifier occurs in the users' text (definitions included)."""
    files = {p for pattern in USERS for p in ROOT.glob(pattern)} | {ROOT / f for f in USERS_FILES}
    return Counter(
        w for p in sorted(files) if p.is_file() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", p.read_text())
    )


def test_every_top_level_function_and_class_has_a_user_outside_the_tests():
    counts = word_counts()
    defined = Counter(name for _, _, name in definitions())
    dead = [
        f"{path.relative_to(ROOT)}:{lineno} {name}"
        for path, lineno, name in definitions()
        if counts[name] <= defined[name] and path.relative_to(PACKAGE).as_posix() not in ORACLES
    ]
    assert not dead, "defined but never used outside tests/:\n" + "\n".join(dead)
