"""README.md and docs/*.md name real things: every test, module, command, console script, make target,
file path, link and dotted ``protein_performer.x.y`` name they mention exists, so a rename that forgets
the docs breaks this test."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "protein_performer"
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# where a relative path in the docs may live: the repository, the package, the configs
ROOTS = (REPO, PACKAGE, REPO / "conf")
# first folders of paths that commands write at run time (examples, not files of the repository)
RUN_OUTPUTS = {"demo_out", "study_results", "family_contacts_out", "runs", "multirun"}


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def code_of(text: str) -> tuple[list[str], list[str]]:
    """The fenced blocks and the inline code spans of a markdown text."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    return blocks, re.findall(r"`([^`\n]+)`", prose)


def python_m_modules(text: str) -> set[tuple[str, bool]]:
    """The modules of every ``python -m protein_performer...`` command, each with whether a placeholder
    follows (``protein_performer.studies.<study>``: then the package before it must exist)."""
    return {(m, bool(p)) for m, p in re.findall(r"python -m (protein_performer(?:\.\w+)*)(\.<)?", text)}


def dotted_names(text: str) -> set[str]:
    """Every dotted ``protein_performer.x.y`` name, and ``from protein_performer.x import a, b`` as x.a, x.b."""
    names = set(re.findall(r"\bprotein_performer(?:\.\w+)+", text))
    for module, imported in re.findall(r"^\s*from (protein_performer[\w.]*) import ([\w, ]+)$", text, flags=re.M):
        names.update(f"{module}.{name.strip()}" for name in imported.split(","))
    return names


def missing_name(name: str) -> str | None:
    """None if ``name`` is a module, or an attribute reached from the longest module prefix; else why not."""
    parts = name.split(".")
    obj, depth = None, 0
    for depth in range(1, len(parts) + 1):
        try:
            obj = importlib.import_module(".".join(parts[:depth]))
        except ModuleNotFoundError as e:
            if e.name != ".".join(parts[:depth]):
                raise
            depth -= 1
            break
    for part in parts[depth:]:
        if not hasattr(obj, part):
            return f"{name} ({'.'.join(parts[:depth])} has no {part})"
        obj = getattr(obj, part)
    return None


def runnable(module: str, placeholder: bool = False) -> bool:
    """``python -m module`` runs something: a module with a main guard, or a package with __main__;
    with ``placeholder``, ``module`` is the package whose modules the command names."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return False
    if spec is None or spec.origin is None:
        return False
    if spec.submodule_search_locations is not None:
        return placeholder or (Path(spec.origin).parent / "__main__.py").is_file()
    return not placeholder and '__name__ == "__main__"' in Path(spec.origin).read_text()


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))


def console_scripts() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def path_tokens(span: str) -> list[str]:
    """The relative repository paths of a code span: tokens with a '/' whose folders are plain names and
    whose last part is a name or a file name (no placeholder, URL, absolute path or ``module.attr``)."""
    tokens = (t.split("::")[0].rstrip(".;:") for t in re.findall(r"[^\s=,\[\]()'\"]+", span))
    return [t for t in tokens if "/" in t and re.fullmatch(r"([\w*-]+/)+([\w*-]+(\.[A-Za-z0-9]{1,5})*)?", t)]


def path_exists(path: str) -> bool:
    if "*" in path:
        return any(any(root.glob(path)) for root in ROOTS)
    return any((root / path).exists() for root in ROOTS)


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_docs_exist():
    names = {doc_id(d) for d in DOCS}
    for page in ("ingest", "training", "analysis", "reliability", "formats", "ARCHITECTURE"):
        assert f"docs/{page}.md" in names
    readme = (REPO / "README.md").read_text().splitlines()
    assert len(readme) < 120, "the README is the first screen and the pipeline; details go to docs/"
    first_screen = "\n".join(readme[:25])
    assert "make demo" in first_screen and "make test" in first_screen


def test_every_test_named_in_the_docs_exists():
    assert len(re.findall(r"tests/(?:\w+/)?test_\w+\.py::test_\w+", ARCHITECTURE.read_text())) >= 30
    missing = []
    for doc in DOCS:
        for path, name in sorted(set(re.findall(r"(tests/(?:\w+/)?test_\w+\.py)::(test_\w+)", doc.read_text()))):
            file = REPO / path
            functions = {n.name for n in ast.walk(ast.parse(file.read_text())) if isinstance(n, ast.FunctionDef)}
            if name not in functions:
                missing.append(f"{doc_id(doc)}: {path}::{name}")
    assert not missing, f"the docs name tests that do not exist: {missing}"


def test_every_module_named_in_the_architecture_exists():
    text = ARCHITECTURE.read_text()
    missing = []
    for folder, name in re.findall(r"`?((?:\w+/)*\w+)/(\w+)\.py`?", text):
        candidates = [PACKAGE / folder / f"{name}.py", REPO / folder / f"{name}.py"]
        if not folder.startswith("tests") and not any(c.exists() for c in candidates):
            missing.append(f"{folder}/{name}.py")
    for folder in re.findall(r"`(\w+(?:/\w+)?)/`", text):
        if not any((root / folder).is_dir() for root in (PACKAGE, PACKAGE / "conf", REPO)):
            missing.append(f"{folder}/")
    assert not missing, f"docs/ARCHITECTURE.md names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_command_and_make_target_exists(doc):
    text = doc.read_text()
    blocks, spans = code_of(text)
    code = "\n".join(blocks + spans)
    commands = [f"python -m {m}{'.<...>' * p}" for m, p in sorted(python_m_modules(text)) if not runnable(m, p)]
    targets = make_targets()
    make = [f"make {t}" for t in sorted(set(re.findall(r"(?:^|\s)make\s+([a-z][\w-]*)", code, flags=re.M)) - targets)]
    scripts = [s for s in sorted(set(re.findall(r"\bpp-[a-z][\w-]*", code))) if s not in console_scripts()]
    assert not commands + make + scripts, f"{doc_id(doc)} names commands that do not exist: {commands + make + scripts}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_dotted_name_exists(doc):
    missing = [why for name in sorted(dotted_names(doc.read_text())) if (why := missing_name(name))]
    assert not missing, f"{doc_id(doc)} names what does not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_path_and_link_exists(doc):
    text = doc.read_text()
    _, spans = code_of(text)
    paths = {p for span in spans for p in path_tokens(span) if p.split("/")[0] not in RUN_OUTPUTS}
    missing = sorted(p for p in paths if not path_exists(p))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (doc.parent / file) if file else doc
        if not linked.exists():
            missing.append(target)
        elif anchor and anchor not in {slug(h) for h in re.findall(r"^#+ (.*)$", linked.read_text(), flags=re.M)}:
            missing.append(target)
    assert not missing, f"{doc_id(doc)} names paths or links that do not exist: {missing}"
