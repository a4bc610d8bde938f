"""Issue 12: when signed policy is required (the default with [mqtt], or a provisioned signing key), no
sequence of unsigned requests, on any control resource, lowers enforcement or widens what may run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.control.resources import _TABLE
from agent.core.policy import DEVICE_LAYER, PolicyLayer
from tests.support.control import Harness
from tests.support.strategies import json_values
from tests.unit.control.test_resources_fuzz import near_valid

ALLOWED = "sha256:" + "c" * 64
ROUTES = sorted(
    {
        (m, tuple(s.replace("{digest}", ALLOWED).replace("{name}", "a").replace("{group}", "g1") for s in r))
        for m, r in _TABLE
    }
    | {("PUT", ("instances", "a")), ("DEL", ("instances", "a"))}
)
WRITES = [r for r in ROUTES if r[0] in ("PUT", "POST", "DEL") and r[1][0] not in ("scan", "verify")]
#: bodies an attacker would send: looser enforcement, more digests, an anchor for everything, a whole layer
LOOSENING = st.sampled_from(
    [
        {"enabled": False},
        {"mode": "audit"},
        {"enabled": True, "mode": "audit"},
        {"digests": [ALLOWED, "sha256:" + "d" * 64]},
        {"name": "a", "kind": "key", "pem": "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n",
         "scope": ["**"]},
        {"version": 99, "enforcement": {"enabled": False, "mode": "audit"}},
        {"version": 99, "allowlist": [{"digest": "sha256:" + "d" * 64}]},
        {"document": {"version": 99, "target": {"device": "dev-1"}, "enforcement": {"enabled": False}},
         "signature": "AAAA", "key_id": "0" * 64, "algorithm": "ed25519"},
        {"image": "registry.example/x", "tag": "1", "trust_anchor": {"pem": "x"}},
    ]
)  # fmt: skip
REQUESTS = st.lists(
    st.tuples(st.sampled_from(WRITES), LOOSENING | near_valid | json_values), min_size=1, max_size=8
)


def _seed(h: Harness) -> None:
    with h.store.transaction() as tx:
        h.store.write_layer(
            tx,
            PolicyLayer.from_document(
                {
                    "version": 5,
                    "enforcement": {"enabled": True, "mode": "enforce"},
                    "allowlist": [{"digest": ALLOWED}],
                },
                DEVICE_LAYER,
                "seed",
            ),
            "2026-01-01T00:00:00.000Z",
        )


def _fingerprint(h: Harness) -> str:
    return json.dumps([lyr.to_document() for lyr in h.store.layers()], sort_keys=True)


_HARNESSES: dict[bool, Harness] = {}


def _harness(factory: Any, signing_key: bool) -> Harness:
    if signing_key not in _HARNESSES:
        h = Harness(factory.mktemp("unsigned"), signing_key=signing_key, unsigned=False)
        _seed(h)
        _HARNESSES[signing_key] = h
    return _HARNESSES[signing_key]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=REQUESTS, signing_key=st.booleans())
def test_no_sequence_of_unsigned_requests_lowers_enforcement(
    tmp_path_factory: Any, requests: list[tuple[tuple[str, tuple[str, ...]], Any]], signing_key: bool
) -> None:
    h = _harness(tmp_path_factory, signing_key)
    assert h.service.effective().enforcement.mode == "enforce"
    before = _fingerprint(h)
    for (method, resource), body in requests:
        code, _, _ = h.call(method, *resource, raw=json.dumps(body).encode())
        assert code in (400, 403, 404), (method, resource, body, code)
    policy = h.service.effective()
    assert policy.enforcement.enabled and policy.enforcement.mode == "enforce"
    assert [str(d) for d in policy.allowlist] == [ALLOWED] and policy.trust_anchors == ()
    assert "group:g1" not in policy.versions or policy.versions["group:g1"] == 0  # PUT fleet/g1 took nothing
    assert _fingerprint(h) == before


def test_the_harness_does_require_signing(tmp_path: Path) -> None:
    h = Harness(tmp_path, unsigned=False)
    code, message, _ = h.call("PUT", "enforcement", body={"enabled": False})
    assert code == 403 and message and "signed" in message
