"""All JSON Schema validation goes through :func:`validate`, which names what was validated and where."""

from __future__ import annotations

import importlib.resources
import json
import re
import threading
from collections.abc import Iterable, Iterator
from functools import cache
from typing import Any

import jsonschema
from jsonschema.validators import validator_for

from agent.errors import SchemaError

#: the schemas are package data (``agent/schemas``; ``schemas/`` at the top of the repository links there), so
#: they are found however the package is installed: checkout, wheel, ``--user``, ``--target``, zipapp
_SCHEMAS = importlib.resources.files("agent") / "schemas"


@cache
def load_schema(name: str) -> dict[str, Any]:
    """Load ``schemas/<name>.schema.json``."""
    resource = _SCHEMAS.joinpath(*f"{name}.schema.json".split("/"))
    try:
        schema: dict[str, Any] = json.loads(resource.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"schema {name!r} is not part of this installation ({resource})") from None
    return schema


_BUILD_LOCK = threading.Lock()


def _validator(name: str, entry: str | None = None) -> Any:
    # one build per schema even when many threads ask at once: checking a schema against its metaschema
    # is costly, and a cold cache hit by every thread together (a burst of requests) would do it each time
    with _BUILD_LOCK:
        return _build_validator(name, entry)


@cache
def _build_validator(name: str, entry: str | None = None) -> Any:
    schema = load_schema(name)
    cls = validator_for(schema)
    cls.check_schema(schema)
    if entry is not None:
        if entry not in schema.get("$defs", {}):
            raise KeyError(f"schema {name!r} has no $defs entry {entry!r}")
        # the same document, entered at one of its definitions: "#/$defs/..." references still resolve
        schema = {**schema, "$ref": f"#/$defs/{entry}"}
        for key in ("properties", "required", "additionalProperties", "type", "title"):
            schema.pop(key, None)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def validate(document: Any, schema: str, what: str, *, entry: str | None = None) -> None:
    """Raise :class:`SchemaError` for the first error of ``document`` against ``schema`` (or one of its
    ``$defs`` entries). An unknown field is named before anything else, and an unknown or missing field is
    named by its own path, read from the error objects (never from their message text)."""
    errors = list(_validator(schema, entry).iter_errors(document))
    if not errors:
        return
    unknown = next((e for e in _flatten(errors) if e.validator == "additionalProperties"), None)
    error = unknown or jsonschema.exceptions.best_match(errors)
    assert error is not None
    at = _pointer(error.absolute_path)
    sch = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = set(sch.get("properties", {}))
        patterns = list(sch.get("patternProperties", {}))
        extra = sorted(
            str(k) for k in error.instance if k not in known and not any(re.search(p, k) for p in patterns)
        )
        if extra:
            raise SchemaError(what, f"{at}/{_escape(extra[0])}", "unknown field")
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [str(k) for k in sch.get("required", ()) if k not in error.instance]
        if missing:
            raise SchemaError(what, f"{at}/{_escape(missing[0])}", error.message)
    raise SchemaError(what, at, error.message)


def _flatten(
    errors: Iterable[jsonschema.exceptions.ValidationError],
) -> Iterator[jsonschema.exceptions.ValidationError]:
    for e in errors:
        yield e
        yield from _flatten(e.context or ())


def _pointer(path: Iterable[Any]) -> str:
    return "".join(f"/{_escape(str(p))}" for p in path)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")
