"""The one JSON Schema helper: it names the field at fault from jsonschema's error objects."""

from __future__ import annotations

from typing import Any

import pytest

from agent.core.schemas import validate
from agent.errors import SchemaError

KEY_ANCHOR = {"name": "a", "kind": "key", "pem": "-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----\n"}


@pytest.mark.parametrize(
    ("doc", "pointer", "detail"),
    [
        ({**KEY_ANCHOR, "colour": "red"}, "/colour", "unknown field"),
        ({"name": "a", "kind": "key"}, "/pem", "'pem' is a required property"),
        (
            {**KEY_ANCHOR, "identities": [{"subject": "x", "extra": 1}]},
            "/identities/0/extra",
            "unknown field",
        ),
        ({**KEY_ANCHOR, "kind": "gpg"}, "/kind", "'gpg' is not one of"),
    ],
)
def test_a_defs_entry_validates_on_its_own(doc: dict[str, Any], pointer: str, detail: str) -> None:
    with pytest.raises(SchemaError) as err:
        validate(doc, "policy", "trust anchor 'a'", entry="trust_anchor")
    assert err.value.pointer == pointer
    assert detail in err.value.detail


def test_a_valid_entry_passes_and_an_unknown_entry_is_a_programming_error() -> None:
    validate(KEY_ANCHOR, "policy", "trust anchor", entry="trust_anchor")
    with pytest.raises(KeyError, match="no \\$defs entry"):
        validate(KEY_ANCHOR, "policy", "x", entry="nothing")


def test_unknown_fields_inside_a_one_of_branch_are_named() -> None:
    doc = {
        "name": "web",
        "image": "registry.example/app",
        "tag": "1",
        "trust_anchor": {"kind": "key", "pem": "x", "bogus": 1},
    }
    with pytest.raises(SchemaError) as err:
        validate(doc, "instance", "instance 'web'")
    assert err.value.pointer == "/trust_anchor/bogus" and err.value.detail == "unknown field"
