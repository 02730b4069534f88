"""The tests are laid out like the code: the framework's under tests/engine, the shop's under tests/shop,
the chart's under tests/helm; and no test module uses another one.

What tests share lives in conftest files and support modules (tests/support.py, tests/shop_support.py,
tests/shop/*_support.py...): a test module that imports another one (or names it as a route target,
which makes a worker import it) runs that module's tests' set-up, hides its helpers, and breaks when it moves.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from tests.support import REPO_ROOT

TESTS = REPO_ROOT / "tests"
TREES = ("engine", "helm", "shop")
ROUTE = re.compile(r"tests(\.\w+)+:\w+")


def all_test_modules() -> list[Path]:
    """Every ``test_*.py`` under tests/."""
    return sorted(TESTS.rglob("test_*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, package: str) -> Iterator[str]:
    """The dotted names an import names: ``from x import y`` gives ``x`` and ``x.y``; relative ones resolved."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, *([base] if base else [])])
        yield base
        yield from (f"{base}.{alias.name}" for alias in node.names)


def _route_targets(tree: ast.AST) -> Iterator[str]:
    """Strings that name a module of tests/ as a route target (``"tests.a.b:handler"``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and ROUTE.fullmatch(node.value):
            yield node.value.split(":")[0]


def is_test_module(name: str) -> bool:
    """Whether a dotted name is (or lies in) a test module of tests/: any part of it is ``test_*``.

    benchmarks/test_*.py are not: they are the harness ``pytest benchmarks`` runs, and the smoke tests
    import it to run it small.
    """
    return name.split(".")[0] == "tests" and any(part.startswith("test_") for part in name.split("."))


def uses_of_test_modules(path: Path) -> list[str]:
    """The test modules ``path`` imports or routes to, other than itself."""
    module = _module_name(path)
    package = module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    names = {name for node in ast.walk(tree) for name in _imported(node, package)} | set(_route_targets(tree))
    return sorted(n for n in names if is_test_module(n) and n != module and not n.startswith(f"{module}."))


def test_no_test_module_imports_another() -> None:
    found = {str(p.relative_to(REPO_ROOT)): uses for p in all_test_modules() if (uses := uses_of_test_modules(p))}
    assert found == {}, "move what they share into a conftest.py or a support module"


def test_every_test_module_lives_under_engine_shop_or_helm() -> None:
    misplaced = [str(p.relative_to(REPO_ROOT)) for p in all_test_modules()
                 if p.relative_to(TESTS).parts[0] not in TREES]
    assert misplaced == [], "tests/engine: the framework, tests/shop: the shop (handlers/), tests/helm: the chart"


def test_the_checks_see_imports_of_every_form() -> None:
    assert len(all_test_modules()) > 50 and Path(__file__) in all_test_modules()
    assert [n for n in ("tests.engine.unit.test_x", "tests.support", "tests.shop.gateway_support",
                        "benchmarks.test_shop_e2e") if is_test_module(n)] == ["tests.engine.unit.test_x"]
    tree = ast.parse("from . import test_a\nfrom .test_b import c\nimport tests.x.test_d\n"
                     "from tests.y import test_e\nR = 'tests.z.test_f:handle'\n")
    package = "tests.engine.unit"
    names = {n for node in ast.walk(tree) for n in _imported(node, package)} | set(_route_targets(tree))
    assert {n for n in names if is_test_module(n)} >= {
        "tests.engine.unit.test_a", "tests.engine.unit.test_b", "tests.x.test_d", "tests.y.test_e", "tests.z.test_f"}
