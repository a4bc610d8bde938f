"""All JSON Schema validation goes through :func:`validate`, which names what was validated and where."""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.validators import validator_for

from agent.errors import SchemaError


def _schema_dirs() -> list[Path]:
    return [
        Path(__file__).resolve().parents[2] / "schemas",  # source checkout / editable install
        Path(sys.prefix) / "share" / "imageguard" / "schemas",  # wheel install (data-files)
    ]


@cache
def load_schema(name: str) -> dict[str, Any]:
    """Load ``schemas/<name>.schema.json``."""
    for base in _schema_dirs():
        path = base / f"{name}.schema.json"
        if path.is_file():
            schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            return schema
    raise FileNotFoundError(f"schema {name!r} not found in {', '.join(map(str, _schema_dirs()))}")


@cache
def _validator(name: str) -> Any:
    schema = load_schema(name)
    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def validate(document: Any, schema: str, what: str) -> None:
    """Raise :class:`SchemaError` for the first (deepest, most relevant) error of ``document``."""
    error = jsonschema.exceptions.best_match(_validator(schema).iter_errors(document))
    if error is not None:
        pointer = "".join(f"/{str(p).replace('~', '~0').replace('/', '~1')}" for p in error.absolute_path)
        raise SchemaError(what, pointer, error.message)
