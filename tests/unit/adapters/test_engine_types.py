"""The engine adapter is typed at its boundary: raw docker-py dicts never reach the runtime."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from agent.adapters.engine import Engine
from agent.core.facts import ListedContainer

RUNTIME = Path(__file__).resolve().parents[3] / "agent" / "runtime"


def engine_methods_the_runtime_calls() -> set[str]:
    names: set[str] = set()
    for path in RUNTIME.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            value = node.value if isinstance(node, ast.Attribute) else None
            if (
                isinstance(node, ast.Attribute)
                and isinstance(value, ast.Attribute)
                and value.attr == "engine"
            ):
                names.add(node.attr)
    return names & {n for n in dir(Engine) if not n.startswith("_")}


def test_nothing_the_runtime_gets_from_the_engine_is_any() -> None:
    called = engine_methods_the_runtime_calls()
    assert {"container_facts", "stop_and_remove", "labelled_containers"} <= called
    for name in sorted(called):
        annotation = inspect.signature(getattr(Engine, name)).return_annotation
        assert "Any" not in str(annotation), f"Engine.{name} returns {annotation}"


def test_a_listed_container_is_parsed_at_the_edge() -> None:
    c = ListedContainer.from_raw({"Id": "abc", "State": "running", "Labels": {"k": "v"}})
    assert c == ListedContainer("abc", "running", {"k": "v"}) and c.running
    assert ListedContainer.from_raw({"Id": 5}) is None
    assert ListedContainer.from_raw({"Id": "x", "Labels": ["k"]}) is None
    assert ListedContainer.from_raw({"Id": "x"}) == ListedContainer("x", "", {})
