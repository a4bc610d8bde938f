"""The CONTAINER-AUTH-V1 resources, in process: Dispatcher + agent.control.resources routes + a real Service on a temp
Store. The engine is unreachable here (engine-backed resources are covered by the integration tests)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.mqtt.kurapayload import KuraMessage, MetricValue, encode_protobuf
from agent.core.records import DecisionRecord
from agent.core.schemas import load_schema, validate
from agent.errors import SchemaError
from tests.support.control import Harness, T
from tests.support.keys import public_pem

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_policy_get_put_unchanged_and_rollback(h: Harness) -> None:
    assert h.ok("get-policy.reply", "GET", "policy")["version"] == 0
    doc = {"version": 3, "allowlist": [{"digest": D1, "comment": "web"}], "enforcement": {"mode": "audit"}}
    assert h.ok("apply-result.reply", "PUT", "policy", body=doc) == {
        "layer": "device",
        "version": 3,
        "status": "applied",
        "revoked": 0,
    }
    assert h.changes == 1
    assert h.ok("apply-result.reply", "PUT", "policy", body=doc)["status"] == "unchanged"
    code, message, _ = h.call("PUT", "policy", body={**doc, "version": 2})
    assert code == 400 and message and "older" in message
    got = h.ok("get-policy.reply", "GET", "policy")
    assert got["version"] == 3 and got["allowlist"] == [{"digest": D1, "comment": "web"}]
    assert [(e["version"], e["status"]) for e in h.policy_events()] == [
        (3, "applied"),
        (3, "unchanged"),
        (2, "rejected"),
    ]
    for event in h.policy_events():
        validate(event, "policy-event", "policy telemetry")


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({"version": 1, "allowlist": [{"digest": 5}]}, "/allowlist/0/digest"),
        ({"version": 1, "allowlist": [{"digest": "sha256:zz"}]}, "/allowlist/0/digest"),
        ({"version": -1}, "/version"),
        ({"version": 1, "surprise": True}, "/"),
        ([1, 2], "/"),
        ({"version": 1, "target": {"device": "someone-else"}}, "/target"),
        ({"version": 1, "target": {"group": "g1"}}, "/target"),
    ],
)
def test_put_policy_rejections_change_nothing(h: Harness, body: Any, pointer: str) -> None:
    before = h.state()
    code, message, _ = h.call("PUT", "policy", body=body)
    assert code == 400
    assert message and f"at {pointer}" in message
    assert h.state() == before and h.changes == 0
    assert [e["status"] for e in h.policy_events()] == ["rejected"]


def test_put_policy_targeted_at_this_device(h: Harness) -> None:
    doc = {"version": 1, "target": {"device": "dev-1"}}
    assert h.ok("apply-result.reply", "PUT", "policy", body=doc)["status"] == "applied"


@pytest.mark.parametrize(
    ("body", "comments"),
    [
        (
            {"digests": [D1, D2.upper().replace("SHA256", "sha256")], "comment": "both"},
            {D1: "both", D2: "both"},
        ),
        ({"entries": [{"digest": D1, "comment": "a"}, {"digest": D2}]}, {D1: "a", D2: ""}),
    ],
)
def test_allowlist_post_forms(h: Harness, body: dict[str, Any], comments: dict[str, str]) -> None:
    result = h.ok("apply-result.reply", "POST", "allowlist", body=body)
    assert result["status"] == "applied" and result["version"] == 1  # one version step
    listed = h.ok("get-allowlist.reply", "GET", "allowlist")
    assert {e["digest"]: e["comment"] for e in listed["allowlist"]} == comments
    assert h.ok("apply-result.reply", "POST", "allowlist", body=body)["status"] == "unchanged"


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({"digests": [D1, "sha256:nothex"]}, "/digests/1"),
        ({"entries": [{"digest": D1}, {"digest": "md5:00"}]}, "/entries/1/digest"),
        ({"digests": []}, "/"),
        ({"digests": [D1], "entries": []}, "/"),
        ({}, "/"),
        ("sha256:" + "1" * 64, "/"),
    ],
)
def test_allowlist_post_invalid_is_all_or_nothing(h: Harness, body: Any, pointer: str) -> None:
    code, message, _ = h.call("POST", "allowlist", body=body)
    assert code == 400
    assert message and f"at {pointer}" in message, message
    assert h.state() == [] and h.changes == 0


def test_allowlist_delete(h: Harness) -> None:
    h.ok("apply-result.reply", "POST", "allowlist", body={"digests": [D1, D2]})
    assert h.ok("apply-result.reply", "DEL", "allowlist", D1)["version"] == 2
    assert [e["digest"] for e in h.ok("get-allowlist.reply", "GET", "allowlist")["allowlist"]] == [D2]
    code, message, _ = h.call("DEL", "allowlist", D1)
    assert code == 404 and message and D1 in message
    code, _, _ = h.call("DEL", "allowlist", "sha256:short")
    assert code == 400
    code, _, _ = h.call("DEL", "allowlist", D3, body={"unexpected": 1})
    assert code == 400


def test_trust_anchors(h: Harness) -> None:
    anchor = {"name": "release", "kind": "key", "pem": public_pem(), "scope": ["registry.example/acme/*"]}
    result = h.ok("apply-result.reply", "PUT", "trust-anchors", "release", body=anchor)
    assert result["status"] == "applied"
    listed = h.ok("get-trust-anchors.reply", "GET", "trust-anchors")["trust_anchors"]
    assert [(a["name"], a["layer"], a["scope"]) for a in listed] == [
        ("release", "device", ["registry.example/acme/*"])
    ]
    before = h.state()
    for body, path, pointer in [
        ({**anchor, "name": "other"}, "release", "/name"),
        ({**anchor, "pem": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"}, "release", None),
        ({**anchor, "kind": "rsa"}, "release", "/kind"),
        ({**anchor, "name": "bad name!"}, "bad name!", "/name"),
    ]:
        code, message, _ = h.call("PUT", "trust-anchors", path, body=body)
        assert code == 400, (body, message)
        if pointer:
            assert message and f"at {pointer}" in message, message
        assert h.state() == before
    assert h.ok("apply-result.reply", "DEL", "trust-anchors", "release")["status"] == "applied"
    code, _, _ = h.call("DEL", "trust-anchors", "release")
    assert code == 404


def test_enforcement(h: Harness) -> None:
    assert h.ok("get-enforcement.reply", "GET", "enforcement") == {"enabled": True, "mode": "enforce"}
    result = h.ok("put-enforcement.reply", "PUT", "enforcement", body={"mode": "audit"})
    assert result["enforcement"] == {"enabled": True, "mode": "audit"} and result["status"] == "applied"
    assert h.ok("get-enforcement.reply", "GET", "enforcement") == {"enabled": True, "mode": "audit"}
    for bad in ({}, {"mode": "lenient"}, {"enabled": "yes"}):
        code, _, _ = h.call("PUT", "enforcement", body=bad)
        assert code == 400


def test_status_and_decision_pages(h: Harness) -> None:
    for i in range(5):
        record = {
            "id": f"d{i}",
            "time": "2024-01-01T00:00:00.000Z",
            "container": {"id": f"c{i}", "name": f"n{i}"},
            "verdict": "blocked",
            "reason": "not-allowlisted",
        }
        h.store.record_decision(DecisionRecord.from_dict(record))
    status = h.ok("get-status.reply", "GET", "status")
    assert status["decisions"] == 5 and status["device"] == "dev-1" and status["groups"] == ["g1"]
    assert status["engine"]["reachable"] is False
    assert status["outbox"]["dropped"] == {}
    seen: list[str] = []
    page = h.ok("get-decisions.reply", "GET", "decisions", body={"limit": 2})
    while True:
        seen += [d["id"] for d in page["decisions"]]
        if page["next"] is None:
            break
        page = h.ok("get-decisions.reply", "GET", "decisions", body={"limit": 2, "before": page["next"]})
    assert seen == ["d4", "d3", "d2", "d1", "d0"]
    assert [d["id"] for d in h.ok("get-decisions.reply", "GET", "decisions")["decisions"]] == seen
    for bad in ({"limit": 0}, {"limit": 501}, {"before": "x"}, {"page": 1}):
        code, message, _ = h.call("GET", "decisions", body=bad)
        assert code == 400 and message and "at /" in message


def test_engine_backed_resources_fail_cleanly(h: Harness) -> None:
    code, message, _ = h.call("GET", "containers")
    assert code == 500 and message and "engine" in message
    code, message, _ = h.call("EXEC", "scan")
    assert code == 500


def test_verify_needs_an_anchor_and_a_valid_reference(h: Harness) -> None:
    code, message, _ = h.call("EXEC", "verify", body={"image": "registry.example/acme/app:1"})
    assert code == 400 and message and "no trust anchor" in message
    code, message, _ = h.call("EXEC", "verify", body={"image": "UPPER/Case:??"})
    assert code == 400 and message and "at /image" in message
    code, message, _ = h.call("EXEC", "verify", body={})
    assert code == 400 and message and "image" in message


@pytest.mark.parametrize(
    ("method", "resource", "status"),
    [
        ("GET", ("nothing",), 404),
        ("GET", ("allowlist", D1, "more"), 404),
        ("PUT", ("status",), 400),
        ("FETCH", ("status",), 400),
    ],
)
def test_unknown_resources_and_methods(
    h: Harness, method: str, resource: tuple[str, ...], status: int
) -> None:
    code, _, _ = h.call(method, *resource)
    assert code == status


def test_protobuf_request_gets_protobuf_reply(h: Harness) -> None:
    code, _, doc = h.call("GET", "enforcement", proto=True)
    assert code == 200 and doc == {"enabled": True, "mode": "enforce"}
    assert h.sent[-1][1][:1] != b"{"


def test_missing_request_id_gets_no_reply(h: Harness) -> None:
    msg = KuraMessage(timestamp_ms=1, metrics={"requester.client.id": MetricValue.string("console")})
    h.dispatcher.handle(T.request("GET", "status"), encode_protobuf(msg))
    assert h.sent == [] and h.dispatcher.stats.dropped == 1


def test_signed_devices_refuse_partial_edits(tmp_path: Path) -> None:
    h = Harness(tmp_path, signing_key=True)
    anchor = {"name": "a", "kind": "key", "pem": public_pem()}
    for method, resource, body in [
        ("POST", ("allowlist",), {"digests": [D1]}),
        ("DEL", ("allowlist", D1), None),
        ("PUT", ("trust-anchors", "a"), anchor),
        ("DEL", ("trust-anchors", "a"), None),
        ("PUT", ("enforcement",), {"mode": "audit"}),
    ]:
        code, message, _ = h.call(method, *resource, body=body)
        assert code == 403, (method, resource, message)
    assert h.state() == []


def test_trust_anchor_schema_matches_policy_schema() -> None:
    """schemas/control/put-trust-anchor.request repeats the policy schema's trust_anchor definition."""
    policy = load_schema("policy")
    control = load_schema("control/put-trust-anchor.request")
    anchor = {k: v for k, v in control.items() if k not in ("$schema", "$id", "title", "$defs")}
    assert anchor == policy["$defs"]["trust_anchor"]
    assert control["$defs"]["identity"] == policy["$defs"]["identity"]


def test_control_schemas_are_valid_schemas() -> None:
    names = [
        p.name.removesuffix(".schema.json") for p in (Path(__file__).parents[3] / "schemas/control").iterdir()
    ]
    assert len(names) >= 20
    for name in names:
        # compiling the validator checks the schema itself (jsonschema raises on a broken one)
        with contextlib.suppress(SchemaError):
            validate({}, f"control/{name}", name)


def test_a_remote_spec_cannot_ask_for_the_host(h: Harness) -> None:
    spec = {
        "image": "registry.example/acme/web",
        "tag": "1",
        "trust_anchor": {"pem": "unused"},
        "run": {"network": "host", "volumes": [{"source": "/", "target": "/host"}]},
    }
    code, message, _ = h.call("PUT", "instances", "web", body=spec)
    assert code == 403 and message and "network 'host' is not permitted" in message
    code, message, _ = h.call(
        "PUT",
        "policy",
        body={
            "version": 1,
            "instances": [{**spec, "name": "web", "run": {"volumes": [{"source": "/", "target": "/h"}]}}],
        },
    )
    assert code == 403 and message and "exposes / of the host" in message
    assert h.ok("get-policy.reply", "GET", "policy")["version"] == 0, "nothing changed"


def test_fleet_layer_by_request_gets_every_check_of_a_retained_one(h: Harness) -> None:
    doc = {"version": 4, "allowlist": [{"digest": D1, "comment": "canary"}]}
    assert h.ok("apply-result.reply", "PUT", "fleet", "g1", body=doc) == {
        "layer": "group:g1",
        "version": 4,
        "status": "applied",
        "revoked": 0,
    }
    assert h.ok("apply-result.reply", "PUT", "fleet", "g1", body=doc)["status"] == "unchanged"
    code, message, _ = h.call("PUT", "fleet", "g1", body={**doc, "version": 3})
    assert code == 400 and message and "older" in message
    # a fleet layer holds no enforcement; a group this device is not in is not its to take
    code, message, _ = h.call("PUT", "fleet", "g1", body={"version": 5, "enforcement": {"mode": "audit"}})
    assert code == 400
    code, message, _ = h.call("PUT", "fleet", "g2", body={"version": 5})
    assert code == 404 and message and "g2" in message
    assert h.ok("get-policy.reply", "GET", "policy", body={"layer": "group:g1"})["version"] == 4
    assert [(e["layer"], e["version"], e["status"]) for e in h.policy_events()] == [
        ("group:g1", 4, "applied"),
        ("group:g1", 4, "unchanged"),
        ("group:g1", 3, "rejected"),
        ("group:g1", 5, "rejected"),
    ]


def test_fleet_layer_by_request_must_be_signed_on_a_signing_device(tmp_path: Path) -> None:
    h = Harness(tmp_path, signing_key=True)
    code, _, _ = h.call("PUT", "fleet", "g1", body={"version": 9, "allowlist": []})
    assert code == 403
    assert h.ok("get-policy.reply", "GET", "policy", body={"layer": "group:g1"})["version"] == 0


def test_dry_run_changes_nothing_and_checks_its_document(h: Harness) -> None:
    # without an engine the dry run cannot look at containers: 500, and the layer was not stored
    code, message, _ = h.call(
        "EXEC", "policy", "dry-run", body={"layer": "group:g1", "document": {"version": 2}}
    )
    assert code == 500 and message and "engine" in message
    assert h.ok("get-policy.reply", "GET", "policy", body={"layer": "group:g1"})["version"] == 0
    assert h.policy_events() == []
    for bad, want in (
        ({"layer": "group:g1"}, 400),
        ({"layer": "group:g1", "document": {"version": 1, "surprise": 1}}, 400),
        ({"layer": "group:nope", "document": {"version": 1}}, 404),
        ({"layer": "nonsense", "document": {"version": 1}}, 400),
    ):
        code, _, _ = h.call("EXEC", "policy", "dry-run", body=bad)
        assert code == want, bad
