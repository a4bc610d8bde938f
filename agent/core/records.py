"""Records the agent keeps and publishes: decisions (verdict telemetry), alerts, policy acknowledgements.

They are shaped as the telemetry messages they become (see schemas/decision.schema.json and
schemas/policy-event.schema.json): every message has a unique id, the time, the device and the policy version.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.core.decision import Decision, Verdict
from agent.core.facts import ContainerFacts
from agent.core.instances import InstanceState
from agent.core.policy import EffectivePolicy
from agent.errors import Code, InputError

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


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One decision on one container, as stored and as published on ``.../verdicts``.

    :meth:`to_dict` is its one serializer (``schemas/decision.schema.json``); :meth:`from_dict` reads a
    stored one back and raises ``InputError`` on a row that is not one.
    """

    id: str
    time: str
    device: str
    container_id: str
    container_name: str
    image: str
    image_id: str | None
    digests: tuple[str, ...]
    verdict: Verdict | None
    reason: Code
    detail: str
    policy_version: int
    policy_layers: tuple[tuple[str, int], ...]
    mode: str
    trigger: str
    action: str
    matched_digest: str | None = None
    anchor: str | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict == "allowed"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "time": self.time,
            "device": self.device,
            "container": {"id": self.container_id, "name": self.container_name},
            "image": self.image,
            "image_id": self.image_id,
            "digests": list(self.digests),
            "verdict": self.verdict,
            "reason": self.reason.value,
            "detail": self.detail,
            "policy_version": self.policy_version,
            "policy_layers": dict(self.policy_layers),
            "mode": self.mode,
            "trigger": self.trigger,
            "action": self.action,
        }
        if self.matched_digest is not None:
            out["matched_digest"] = self.matched_digest
        if self.anchor is not None:
            out["anchor"] = self.anchor
        return out

    def alert(self) -> dict[str, Any]:
        """The ``.../alerts`` message for a blocked (or would-be-blocked) container: the record, re-identified."""
        return dict(self.to_dict(), id=new_id(), alert="container-blocked", decision_id=self.id)

    @classmethod
    def from_dict(cls, doc: Any) -> DecisionRecord:
        try:
            container = doc["container"]
            return cls(
                id=str(doc["id"]),
                time=str(doc["time"]),
                device=str(doc.get("device", "")),
                container_id=str(container["id"]),
                container_name=str(container.get("name", "")),
                image=str(doc.get("image", "")),
                image_id=doc.get("image_id"),
                digests=tuple(str(d) for d in doc.get("digests", ())),
                verdict=doc["verdict"],
                reason=Code(doc["reason"]),
                detail=str(doc.get("detail", "")),
                policy_version=int(doc.get("policy_version", 0)),
                policy_layers=tuple((str(k), int(v)) for k, v in dict(doc.get("policy_layers", {})).items()),
                mode=str(doc.get("mode", "")),
                trigger=str(doc.get("trigger", "")),
                action=str(doc.get("action", "")),
                matched_digest=doc.get("matched_digest"),
                anchor=doc.get("anchor"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"not a decision record: {exc!r}") from None


def decision_record(
    decision: Decision,
    facts: ContainerFacts,
    policy: EffectivePolicy,
    *,
    device: str,
    trigger: str,
    action: str,
    now: float | None = None,
) -> DecisionRecord:
    return DecisionRecord(
        id=new_id(),
        time=utc_now(now),
        device=device,
        container_id=facts.id,
        container_name=facts.name,
        image=facts.image,
        image_id=str(facts.image_id) if facts.image_id else None,
        digests=tuple(str(d) for d in decision.digests),
        verdict=decision.verdict,
        reason=decision.reason,
        detail=decision.detail,
        policy_version=policy.version,
        policy_layers=tuple(policy.versions.items()),
        mode=policy.enforcement.mode,
        trigger=trigger,
        action=action,
        matched_digest=str(decision.matched) if decision.matched is not None else None,
        anchor=decision.anchor,
    )


def decision_telemetry(record: DecisionRecord) -> list[OutboxMessage]:
    """A verdict message for every decision, plus an alert for every blocked or would-be-blocked one."""
    if record.allowed:
        return [OutboxMessage("verdicts", record.to_dict(), PRIORITY_ALLOWED_VERDICT)]
    return [
        OutboxMessage("verdicts", record.to_dict(), PRIORITY_BLOCKED_VERDICT),
        OutboxMessage("alerts", record.alert(), PRIORITY_ALERT),
    ]


@dataclass(frozen=True, slots=True)
class PolicyEvent:
    """Acknowledgement of an applied, unchanged or rejected policy change (``.../policy`` telemetry,
    ``schemas/policy-event.schema.json``)."""

    device: str
    layer: str
    version: int
    status: str
    policy_version: int
    source: str
    reason: str | None = None
    detail: str | None = None
    id: str = field(default_factory=lambda: new_id())
    time: str = field(default_factory=lambda: utc_now())

    def to_dict(self) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "id": self.id,
            "time": self.time,
            "device": self.device,
            "layer": self.layer,
            "version": self.version,
            "status": self.status,
            "policy_version": self.policy_version,
            "source": self.source,
        }
        if self.reason:
            msg["reason"] = self.reason
        if self.detail:
            msg["detail"] = self.detail
        return msg

    def message(self) -> OutboxMessage:
        return OutboxMessage("policy", self.to_dict(), PRIORITY_POLICY)


@dataclass(frozen=True, slots=True)
class InstanceEvent:
    """A managed instance's status change (``.../instances``, ``schemas/instance-event.schema.json``)."""

    device: str
    policy_version: int
    state: InstanceState
    image: str | None = None
    id: str = field(default_factory=lambda: new_id())
    #: when the event happened: the state's own time, else the moment the event was made (fixed once)
    time: str = field(default_factory=lambda: utc_now())

    def to_dict(self) -> dict[str, Any]:
        msg = {
            "id": self.id,
            "time": self.state.updated_at or self.time,
            "device": self.device,
            "policy_version": self.policy_version,
            **self.state.to_dict(),
        }
        if self.image is not None:
            msg["image"] = self.image
        return msg

    def message(self) -> OutboxMessage:
        return OutboxMessage("instances", self.to_dict(), PRIORITY_INSTANCE)


@dataclass(frozen=True, slots=True)
class InstanceAlert:
    """An update of a managed instance refused (``.../alerts``, ``schemas/instance-alert.schema.json``)."""

    device: str
    policy_version: int
    instance: str
    image: str
    pinned_digest: str
    reason: Code
    detail: str
    id: str = field(default_factory=lambda: new_id())
    time: str = field(default_factory=lambda: utc_now())

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "device": self.device,
            "policy_version": self.policy_version,
            "alert": "instance-update-rejected",
            "instance": self.instance,
            "image": self.image,
            "pinned_digest": self.pinned_digest,
            "reason": self.reason.value,
            "detail": self.detail,
        }

    def message(self) -> OutboxMessage:
        return OutboxMessage("alerts", self.to_dict(), PRIORITY_ALERT)


@dataclass(frozen=True, slots=True)
class PluginSlotAlert:
    """Something other than ImageGuard could answer dockerd's authorization (``.../alerts``,
    ``schemas/plugin-slot-alert.schema.json``)."""

    device: str
    findings: tuple[str, ...]
    id: str = field(default_factory=lambda: new_id())
    time: str = field(default_factory=lambda: utc_now())

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "device": self.device,
            "alert": "authz-plugin-slot",
            "findings": list(self.findings),
        }

    def message(self) -> OutboxMessage:
        return OutboxMessage("alerts", self.to_dict(), PRIORITY_ALERT)


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
    """The ``.../policy`` message of :class:`PolicyEvent`."""
    return PolicyEvent(
        device, layer, version, status, policy_version, source, reason, detail, time=utc_now(now)
    ).message()


def plugin_slot_alert(device: str, findings: list[str], now: float | None = None) -> OutboxMessage:
    return PluginSlotAlert(device, tuple(findings), time=utc_now(now)).message()
