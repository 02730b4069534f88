"""Two layers, one direction: engine/ (the framework) imports nothing of handlers/ (the shop), and no module
of the project is in an import circle.

The import graph is read from the source with ``ast``, every import counted wherever it is written (in a
function, under ``TYPE_CHECKING``): ``import engine.x`` and ``from engine.x import y`` are edges to
``engine.x`` (to ``engine.x.y`` when that is a module), relative imports resolved against the package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.support import REPO_ROOT

PACKAGES = ("engine", "handlers")


def modules() -> dict[str, Path]:
    """Module name -> source file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """The dotted names an import statement names (``from x import y`` gives ``x`` and ``x.y``)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = module.split(".")
            anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
            base = ".".join([*anchor, *([base] if base else [])])
        yield base
        yield from (f"{base}.{alias.name}" for alias in node.names)


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest project module that ``name`` is or lies in (None: not the project's)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in ast.walk(tree):
            for name in _imported(node, module, path.name == "__init__.py"):
                target = _resolve(name, known)
                if target is not None and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: each set of modules that all reach one another (more than one module)."""
    reach = {module: reachable(graph, module) for module in graph}
    found: list[list[str]] = []
    for module in sorted(graph):
        circle = sorted({module} | {other for other in reach[module] if module in reach.get(other, set())})
        if len(circle) > 1 and circle not in found:
            found.append(circle)
    return found


def test_the_graph_sees_every_module_and_the_imports_between_them() -> None:
    graph = import_graph()
    assert {"engine.cli", "engine.runtime", "handlers.payments", "handlers.tools.commands"} <= set(graph)
    assert "engine.runtime" in graph["engine.cli"]
    assert "handlers.payments" in graph["handlers.payments_chaos"]
    assert "handlers.tools.demo" in graph["handlers.tools.commands"]  # imported inside a function


def test_the_engine_imports_nothing_of_the_shop() -> None:
    graph = import_graph()
    upward = {m: sorted(t for t in targets if t.split(".")[0] == "handlers")
              for m, targets in graph.items() if m.split(".")[0] == "engine"}
    assert {m: t for m, t in upward.items() if t} == {}


def test_no_module_is_in_an_import_circle() -> None:
    assert cycles(import_graph()) == []


def test_a_circle_is_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
