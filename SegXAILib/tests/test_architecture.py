"""The layers of docs/ARCHITECTURE.md, checked on the source: who may import whom.

Every import counts, function-local ones included (a cycle held together by imports inside functions
is still a cycle), and so do the names that are imported by string: the public API's lazy exports
(``SegXAILib.EXPORTS``) and the method registry (``SegXAILib.methods.EXPLAINERS``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import SegXAILib
from SegXAILib.methods import EXPLAINERS

PACKAGE = Path(SegXAILib.__file__).parent

EXPLAINER_MODULES = sorted({spec.partition(":")[0] for spec in EXPLAINERS.values()})
"""The modules that hold an explainer class (gradcam, protoseg, ..., uncertainty.sampling)."""


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, extra: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports anywhere in its source (tests left out).

    ``from .x import name`` counts as an import of ``x.name`` when that is a module, else of ``x``.
    """
    modules = {module_name(p, root): p for p in root.rglob("*.py") if "tests" not in p.relative_to(root).parts}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    if f"{target}.{alias.name}" in modules:
                        found.add(f"{target}.{alias.name}")
                    elif target in modules:
                        found.add(target)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name in modules}
        found.discard(name)
        graph[name] = found
    for name, targets in (extra or {}).items():
        graph[name] |= targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    lazy = {"SegXAILib": {f"SegXAILib.{module}" for module in SegXAILib.EXPORTS.values()},
            "SegXAILib.methods": set(EXPLAINER_MODULES)}
    return import_graph(PACKAGE, lazy)


def test_the_checker_finds_a_cycle_made_of_function_local_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (package / "c.py").write_text("def g():\n    from pkg import a\n")
    (package / "d.py").write_text("from . import c\n")
    graph = import_graph(package)
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_nothing_imports_the_command_line(graph):
    assert [name for name, targets in graph.items() if "SegXAILib.cli" in targets] == []


def test_explainers_import_no_verdict_outputs_or_uncertainty(graph):
    forbidden = ("SegXAILib.quality", "SegXAILib.reliability", "SegXAILib.outputs", "SegXAILib.verdict",
                 "SegXAILib.case", "SegXAILib.uncertainty", "SegXAILib.methods")
    found = {name: sorted(t for t in targets if t.startswith(forbidden))
             for name, targets in graph.items() if name.startswith("SegXAILib.explain")}
    assert {name: targets for name, targets in found.items() if targets} == {}


def test_no_explainer_imports_another(graph):
    assert len(EXPLAINER_MODULES) == 13  # explain/: 11 modules, uncertainty/: 2
    found = {name: sorted(graph[name] & set(EXPLAINER_MODULES)) for name in EXPLAINER_MODULES}
    assert {name: targets for name, targets in found.items() if targets} == {}


def test_uncertainty_uses_only_the_explainers_infrastructure(graph):
    """uncertainty/ may use the explainer interface (explain/base.py, explain/options.py), never an explainer,
    and explain/ never imports uncertainty/ (the test above): no two-way dependency between the two packages."""
    allowed = {"SegXAILib.explain.base", "SegXAILib.explain.options"}
    found = {name: sorted(t for t in targets if t.startswith("SegXAILib.explain") and t not in allowed)
             for name, targets in graph.items() if name.startswith("SegXAILib.uncertainty")}
    assert {name: targets for name, targets in found.items() if targets} == {}
