"""Imports go one way: a module imports only layers below its own, or its own subpackage, never in a circle.

Every import statement counts, wherever it stands (module level, inside a function, under TYPE_CHECKING):
lazy imports save memory at start-up but must not hide a dependency that points upward.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "agent"

# Lowest first. A unit is a subpackage or a top-level module; units on one rank may not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("agent", "agent.errors", "agent.logs"),
    ("agent.core",),
    ("agent.config",),
    ("agent.verify",),
    ("agent.adapters",),
    ("agent.runtime",),
    ("agent.control", "agent.console"),
    ("agent.app",),
    ("agent.cli",),
    ("agent.__main__",),
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The agent modules that ``module`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                drop = node.level - 1 if is_package else node.level
                base = base[: len(base) - drop]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # "from agent.core import policy" imports the submodule agent.core.policy
            found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known)
    return {m for m in found if m == "agent" or m.startswith("agent.")}


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {m: imported(m, p, known) - {m} for m, p in modules.items()}


def test_every_unit_has_a_layer() -> None:
    missing = sorted({unit_of(m) for m in all_modules()} - set(RANK))
    assert not missing, f"give these a place in LAYERS: {missing}"


def test_subpackages_say_what_they_own() -> None:
    for path in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and "import" in doc, f"{path}: the docstring must say what it owns and may import"


def test_no_upward_or_sideways_import() -> None:
    wrong = []
    for module, deps in graph().items():
        here = unit_of(module)
        for dep in deps:
            there = unit_of(dep)
            if there == here or there == "agent":
                continue
            if RANK[there] >= RANK[here]:
                wrong.append(f"{module} imports {dep}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(g.get(m, ())):
            if dep not in g or dep == "agent":
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    ("module", "code", "expected"),
    [
        ("agent.core.policy", "from agent.core import digest", {"agent.core", "agent.core.digest"}),
        ("agent.core.policy", "from .digest import Digest", {"agent.core.digest"}),
        ("agent.core.policy", "def f():\n    import agent.runtime.enforcer", {"agent.runtime.enforcer"}),
        ("agent.core.policy", "import json", set()),
    ],
)
def test_the_walk_sees_every_form_of_import(
    module: str, code: str, expected: set[str], tmp_path: Path
) -> None:
    path = tmp_path / "m.py"
    path.write_text(code)
    assert imported(module, path, {"agent.core.digest"}) == expected
