"""Hostile input at the request handler: arbitrary bytes and arbitrary JSON bodies on every resource.

Nothing may crash, every request with ids gets exactly one reply, and a request that is not answered 200
changes no stored state.
"""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.adapters.mqtt.kurapayload import KuraMessage, MetricValue, encode_protobuf
from agent.control.resources import _TABLE
from tests.support.control import Harness, T
from tests.support.strategies import json_values

RESOURCES = sorted(
    {
        (m, tuple(s.replace("{digest}", "sha256:" + "a" * 64).replace("{name}", "a") for s in r))
        for m, r in _TABLE
    }
)
KEYS = [
    "version",
    "allowlist",
    "trust_anchors",
    "enforcement",
    "target",
    "digests",
    "entries",
    "comment",
    "digest",
    "name",
    "kind",
    "pem",
    "scope",
    "enabled",
    "mode",
    "limit",
    "before",
    "layer",
    "dry_run",
    "image",
]
#: objects with the keys the resources know, so that the schemas are exercised beyond their first check
near_valid = st.dictionaries(
    st.sampled_from(KEYS), json_values | st.sampled_from(["sha256:" + "b" * 64, "audit"])
)
ENGINE_FREE = [r for r in RESOURCES if r[1][0] not in ("containers", "scan", "verify", "status")]


def _snapshot(h: Harness) -> tuple[object, ...]:
    return (
        json.dumps([lyr.to_document() for lyr in h.store.layers()], sort_keys=True),
        h.store.decision_count(),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(RESOURCES), payload=st.binary(max_size=300))
def test_arbitrary_bytes(
    tmp_path_factory: object, route: tuple[str, tuple[str, ...]], payload: bytes
) -> None:
    h = _harness(tmp_path_factory)
    before = _snapshot(h)
    h.dispatcher.handle(T.request(route[0], *route[1]), payload)
    assert len(h.sent) <= 1
    assert h.dispatcher.stats.errors == 0
    assert _snapshot(h) == before


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ENGINE_FREE), doc=json_values | near_valid, proto=st.booleans())
def test_arbitrary_json_bodies(
    tmp_path_factory: object, route: tuple[str, tuple[str, ...]], doc: object, proto: bool
) -> None:
    h = _harness(tmp_path_factory)
    before = _snapshot(h)
    code, _, _ = h.call(route[0], *route[1], raw=json.dumps(doc).encode(), proto=proto)
    assert code in (200, 400, 404), code
    assert h.dispatcher.stats.errors == 0
    if code != 200:
        assert _snapshot(h) == before


_CACHE: list[Harness] = []


def _harness(factory: object) -> Harness:
    """One store for all examples (a fresh one per example would dominate the run time); each example
    compares the state before and after, so it needs no pristine store."""
    if not _CACHE:
        _CACHE.append(Harness(factory.mktemp("control-fuzz")))  # type: ignore[attr-defined]
    h = _CACHE[0]
    h.sent.clear()
    return h


def test_bytes_without_ids_are_dropped(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    msg = KuraMessage(timestamp_ms=1, metrics={"request.id": MetricValue.string("1")}, body=b"{}")
    h.dispatcher.handle(T.request("PUT", "policy"), encode_protobuf(msg))
    h.dispatcher.handle(T.request("PUT", "policy"), b"\x00garbage")
    assert h.sent == [] and h.dispatcher.stats.dropped == 2
