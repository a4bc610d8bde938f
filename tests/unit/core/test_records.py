"""Decision records and telemetry messages: shape, ids and priorities."""

from __future__ import annotations

import re
from typing import Any

import pytest

from agent.core.decision import Decision
from agent.core.digest import Digest
from agent.core.facts import ContainerFacts
from agent.core.imageref import ImageRef
from agent.core.policy import EffectivePolicy, Enforcement, PolicyLayer, group_layer
from agent.core.records import (
    PRIORITY_ALERT,
    PRIORITY_ALLOWED_VERDICT,
    PRIORITY_BLOCKED_VERDICT,
    PRIORITY_POLICY,
    DecisionRecord,
    decision_record,
    decision_telemetry,
    new_id,
    policy_event,
    utc_now,
)
from agent.core.schemas import validate
from agent.errors import Code, InputError

REPO_D = Digest.of(b"manifest")
IMAGE_ID = Digest.of(b"config")
FACTS = ContainerFacts(
    id="ab" * 32,
    name="web",
    image="registry.example:5000/acme/app:1",
    image_id=IMAGE_ID,
    repo_digests=((ImageRef.parse(f"registry.example:5000/acme/app@{REPO_D}"), REPO_D),),
)
POLICY = EffectivePolicy.compose(
    [PolicyLayer(version=4), PolicyLayer(name=group_layer("g"), version=9)], Enforcement(True, "audit")
)


def test_utc_now() -> None:
    assert utc_now(0) == "1970-01-01T00:00:00.000Z"
    assert utc_now(1_700_000_000.5) == "2023-11-14T22:13:20.500Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", utc_now())


def test_ids_are_unique() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_decision_record() -> None:
    d = Decision("allowed", Code.SIGNATURE_VERIFIED, "ok", FACTS.digests, matched=REPO_D, anchor="acme")
    rec = decision_record(d, FACTS, POLICY, device="edge-1", trigger="event", action="none", now=0)
    assert rec.to_dict() == {
        "id": rec.id,
        "time": "1970-01-01T00:00:00.000Z",
        "device": "edge-1",
        "container": {"id": FACTS.id, "name": "web"},
        "image": "registry.example:5000/acme/app:1",
        "image_id": str(IMAGE_ID),
        "digests": [str(REPO_D), str(IMAGE_ID)],
        "verdict": "allowed",
        "reason": "signature-verified",
        "detail": "ok",
        "policy_version": 4,
        "policy_layers": {"device": 4, "group:g": 9},
        "mode": "audit",
        "trigger": "event",
        "action": "none",
        "matched_digest": str(REPO_D),
        "anchor": "acme",
    }
    other = decision_record(d, FACTS, POLICY, device="edge-1", trigger="event", action="none", now=0)
    assert other.id != rec.id


def test_decision_record_without_match() -> None:
    facts = ContainerFacts(id="c", name="n", image="x", image_id=None)
    d = Decision("blocked", Code.NO_DIGEST, "none", ())
    rec = decision_record(d, facts, POLICY, device="e", trigger="scan", action="removed")
    assert rec.image_id is None
    assert rec.digests == ()
    assert "matched_digest" not in rec.to_dict() and "anchor" not in rec.to_dict()


def test_allowed_decision_gives_one_verdict() -> None:
    rec = decision_record(
        Decision("allowed", Code.ALLOWLISTED, "ok", FACTS.digests, matched=REPO_D),
        FACTS,
        POLICY,
        device="e",
        trigger="event",
        action="none",
    )
    (m,) = decision_telemetry(rec)
    assert (m.kind, m.priority, m.message) == ("verdicts", PRIORITY_ALLOWED_VERDICT, rec.to_dict())


@pytest.mark.parametrize("verdict", ["blocked", "would-block"])
def test_negative_decision_gives_a_verdict_and_an_alert(verdict: str) -> None:
    d = Decision(verdict, Code.SIGNATURE_INVALID, "bad", FACTS.digests)  # type: ignore[arg-type]
    rec = decision_record(d, FACTS, POLICY, device="e", trigger="event", action="removed")
    verdict_msg, alert = decision_telemetry(rec)
    assert (verdict_msg.kind, verdict_msg.priority, verdict_msg.message) == (
        "verdicts",
        PRIORITY_BLOCKED_VERDICT,
        rec.to_dict(),
    )
    assert (alert.kind, alert.priority) == ("alerts", PRIORITY_ALERT)
    assert alert.message["alert"] == "container-blocked"
    assert alert.message["decision_id"] == rec.id
    assert alert.message["id"] != rec.id
    assert {k: v for k, v in alert.message.items() if k not in ("id", "alert", "decision_id")} == {
        k: v for k, v in rec.to_dict().items() if k != "id"
    }
    assert "alert" not in rec.to_dict()  # the record itself is not changed


def test_policy_event() -> None:
    m = policy_event(
        device="edge-1",
        layer="device",
        version=3,
        status="rejected",
        policy_version=2,
        source="cli",
        reason="policy-rollback",
        detail="older",
        now=0,
    )
    assert (m.kind, m.priority) == ("policy", PRIORITY_POLICY)
    assert m.message == {
        "id": m.message["id"],
        "time": "1970-01-01T00:00:00.000Z",
        "device": "edge-1",
        "layer": "device",
        "version": 3,
        "status": "rejected",
        "policy_version": 2,
        "source": "cli",
        "reason": "policy-rollback",
        "detail": "older",
    }
    applied = policy_event(
        device="e", layer="group:g", version=1, status="applied", policy_version=0, source="mqtt"
    )
    assert "reason" not in applied.message and "detail" not in applied.message


def test_decision_record_round_trips_and_matches_its_schema() -> None:
    for d in (
        Decision("allowed", Code.SIGNATURE_VERIFIED, "ok", FACTS.digests, matched=REPO_D, anchor="acme"),
        Decision("blocked", Code.NOT_ALLOWLISTED, "no entry", FACTS.digests),
        Decision(None, Code.NOT_ALLOWLISTED, "would be verified", FACTS.digests),
    ):
        rec = decision_record(d, FACTS, POLICY, device="e", trigger="scan", action="none", now=0)
        validate(rec.to_dict(), "decision", "decision record")
        assert DecisionRecord.from_dict(rec.to_dict()) == rec
        validate(
            {k: v for k, v in rec.alert().items() if k not in ("alert", "decision_id")}, "decision", "alert"
        )


@pytest.mark.parametrize(
    "row",
    [
        {},
        {"id": "x"},
        {"id": "x", "time": "t", "container": {"id": "c"}, "verdict": "allowed", "reason": "?"},
    ],
)
def test_a_row_that_is_no_decision_record_is_refused(row: dict[str, Any]) -> None:
    with pytest.raises(InputError, match="not a decision record"):
        DecisionRecord.from_dict(row)


def test_every_telemetry_record_matches_its_schema() -> None:
    from agent.core.instances import InstanceState
    from agent.core.records import InstanceAlert, InstanceEvent, PluginSlotAlert, PolicyEvent

    cases = [
        (
            PolicyEvent("e", "device", 3, "rejected", 2, "cli", "policy-conflict", "differs"),
            "policy-event",
            "policy",
        ),
        (PolicyEvent("e", "group:g", 1, "applied", 0, "fleet:g"), "policy-event", "policy"),
        (
            InstanceEvent(
                "e", 4, InstanceState("web", "running", pinned_digest=IMAGE_ID, container_id="c"), "r/app:1"
            ),
            "instance-event",
            "instances",
        ),
        (
            InstanceAlert("e", 4, "web", "r/app:1", str(IMAGE_ID), Code.SIGNATURE_INVALID, "bad"),
            "instance-alert",
            "alerts",
        ),
        (
            PluginSlotAlert("e", ("managed plugin x is an authorization plugin",)),
            "plugin-slot-alert",
            "alerts",
        ),
    ]
    for record, schema, kind in cases:
        validate(record.to_dict(), schema, schema)
        assert record.message().kind == kind and record.message().message == record.to_dict()
