"""Records the agent keeps and publishes: decisions (verdict telemetry), alerts, policy acknowledgements.

They are shaped as the telemetry messages they become (see schemas/decision.schema.json and
schemas/policy-event.schema.json): every message has a unique id, the time, the device and the policy version.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.core.decision import Decision
from agent.core.facts import ContainerFacts
from agent.core.policy import EffectivePolicy

#: outbox priorities: when the outbox is full the highest number goes first (alerts are kept longest)
PRIORITY_ALERT = 0
PRIORITY_POLICY = 1
PRIORITY_BLOCKED_VERDICT = 2
PRIORITY_ALLOWED_VERDICT = 3
#: managed instance status changes: as important as policy acknowledgements
PRIORITY_INSTANCE = 1


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    kind: str  # "verdicts" | "alerts" | "policy" | "instances" ...: the telemetry topic suffix
    message: dict[str, Any]
    priority: int
    topic: str = ""  # empty: the data topic named by kind


def utc_now(ts: float | None = None) -> str:
    moment = datetime.now(UTC) if ts is None else datetime.fromtimestamp(ts, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_id() -> str:
    return uuid.uuid4().hex


def decision_record(
    decision: Decision,
    facts: ContainerFacts,
    policy: EffectivePolicy,
    *,
    device: str,
    trigger: str,
    action: str,
    now: float | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": new_id(),
        "time": utc_now(now),
        "device": device,
        "container": {"id": facts.id, "name": facts.name},
        "image": facts.image,
        "image_id": str(facts.image_id) if facts.image_id else None,
        "digests": [str(d) for d in decision.digests],
        "verdict": decision.verdict,
        "reason": decision.reason.value,
        "detail": decision.detail,
        "policy_version": policy.version,
        "policy_layers": dict(policy.versions),
        "mode": policy.enforcement.mode,
        "trigger": trigger,
        "action": action,
    }
    if decision.matched is not None:
        record["matched_digest"] = str(decision.matched)
    if decision.anchor is not None:
        record["anchor"] = decision.anchor
    return record


def decision_telemetry(record: dict[str, Any]) -> list[OutboxMessage]:
    """A verdict message for every decision, plus an alert for every blocked or would-be-blocked one."""
    if record["verdict"] == "allowed":
        return [OutboxMessage("verdicts", record, PRIORITY_ALLOWED_VERDICT)]
    alert = dict(record, id=new_id(), alert="container-blocked", decision_id=record["id"])
    return [
        OutboxMessage("verdicts", record, PRIORITY_BLOCKED_VERDICT),
        OutboxMessage("alerts", alert, PRIORITY_ALERT),
    ]


def policy_event(
    *,
    device: str,
    layer: str,
    version: int,
    status: str,
    policy_version: int,
    source: str,
    reason: str | None = None,
    detail: str | None = None,
    now: float | None = None,
) -> OutboxMessage:
    """Acknowledgement of an applied, unchanged or rejected policy change (``.../policy`` telemetry)."""
    msg: dict[str, Any] = {
        "id": new_id(),
        "time": utc_now(now),
        "device": device,
        "layer": layer,
        "version": version,
        "status": status,
        "policy_version": policy_version,
        "source": source,
    }
    if reason:
        msg["reason"] = reason
    if detail:
        msg["detail"] = detail
    return OutboxMessage("policy", msg, PRIORITY_POLICY)
