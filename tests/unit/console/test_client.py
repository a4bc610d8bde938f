"""The console's pure parts: event parsing, the device registry, rollout tracking, exit codes, layer checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.adapters.mqtt.codec import PayloadCodec
from agent.adapters.mqtt.kurapayload import KuraMessage, MetricValue
from agent.cli.console import describe_event, prepare_layer
from agent.console.client import (
    DeviceRegistry,
    Event,
    Reply,
    RolloutTracker,
    exit_code_for,
    parse_event,
)
from agent.core.digest import Digest
from agent.errors import InputError, PolicyError
from agent.verify.cosign.keys import public_key_pem
from agent.verify.policy_signature import PolicyVerifier

CODEC = PayloadCodec()
D1 = str(Digest.of(b"x"))


@pytest.mark.parametrize(("code", "exit_code"), [(200, 0), (400, 2), (403, 2), (404, 1), (500, 1), (201, 1)])
def test_request_exit_codes(code: int, exit_code: int) -> None:
    assert exit_code_for(code) == exit_code


def test_reply_document() -> None:
    assert Reply(200, b'{"a": 1}').document() == {"a": 1}
    assert Reply(200, b"plain").document() == "plain"
    assert Reply(200, None).document() is None


def _kura(body: Any = None, **metrics: str) -> bytes:
    raw = json.dumps(body).encode() if body is not None else None
    return CODEC.encode(KuraMessage(1, {k: MetricValue.string(v) for k, v in metrics.items()}, raw))


@pytest.mark.parametrize(
    ("topic", "payload", "expected"),
    [
        ("acme/dev-1/CONTAINER-AUTH-V1/alerts", _kura({"verdict": "blocked"}), ("alerts", "dev-1")),
        ("acme/dev-1/CONTAINER-AUTH-V1/policy", _kura({"status": "applied"}), ("policy", "dev-1")),
        ("$EDC/acme/dev-2/MQTT/BIRTH", _kura(imageguard_groups="a,b"), ("BIRTH", "dev-2")),
        ("$EDC/acme/dev-2/MQTT/LWT", b"", ("LWT", "dev-2")),
        ("other/dev-1/CONTAINER-AUTH-V1/alerts", _kura({}), None),  # another account
        ("acme/dev-1/OTHER-APP/alerts", _kura({}), None),
        ("acme/dev-1/CONTAINER-AUTH-V1/unknown", _kura({}), None),
        ("$EDC/acme/dev-2/MQTT/BIRTH", b"\xff\xff garbage", None),
    ],
)
def test_parse_event(topic: str, payload: bytes, expected: tuple[str, str] | None) -> None:
    event = parse_event(topic, payload, account="acme", prefix="$EDC", codec=CODEC)
    assert (None if event is None else (event.kind, event.device)) == expected


def test_event_data_is_the_json_body_or_the_metrics() -> None:
    event = parse_event(
        "acme/d/CONTAINER-AUTH-V1/policy",
        _kura({"layer": "group:g"}),
        account="acme",
        prefix="$EDC",
        codec=CODEC,
    )
    assert event is not None and event.data == {"layer": "group:g"}
    birth = parse_event(
        "$EDC/acme/d/MQTT/BIRTH", _kura(display_name="D"), account="acme", prefix="$EDC", codec=CODEC
    )
    assert birth is not None and birth.data == {"display_name": "D"}


def birth(device: str, groups: str = "g", kind: str = "BIRTH") -> Event:
    return Event(kind, device, "", {"imageguard_groups": groups, "imageguard_policy_version": "3"})


def ack(
    device: str, status: str = "applied", version: int = 5, layer: str = "group:g", **extra: Any
) -> Event:
    return Event("policy", device, "", {"layer": layer, "version": version, "status": status, **extra})


def test_registry_tracks_births_and_disconnects(tmp_path: Path) -> None:
    path = tmp_path / "devices.json"
    reg = DeviceRegistry(path)
    assert reg.observe(birth("a", "g,h"), now=1.0)
    assert not reg.observe(birth("a", "g,h"), now=2.0)  # nothing new
    assert reg.observe(birth("b", "h"))
    assert not reg.observe(ack("a"))
    assert reg.members("g") == ["a"] and reg.members("h") == ["a", "b"]
    assert reg.observe(Event("LWT", "a", "", {}))
    assert reg.members("h") == ["b"]
    reg.save()
    again = DeviceRegistry(path)
    assert {d: s.online for d, s in again.devices.items()} == {"a": False, "b": True}
    assert again.devices["b"].groups == ("h",) and again.devices["b"].policy_version == "3"


def test_registry_ignores_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "devices.json"
    path.write_text("{not json")
    assert DeviceRegistry(path).devices == {}
    path.write_text('{"devices": [{"device": 1}]}')
    assert DeviceRegistry(path).devices == {}


def test_rollout_completes_when_every_known_member_answered() -> None:
    t = RolloutTracker("g", 5, expected=["a"], settle=1.0)
    assert not t.complete(now=100)
    assert t.observe(birth("b"), now=100)
    assert not t.observe(birth("c", groups="other"), now=100)  # not a member
    assert not t.observe(ack("a", version=4), now=100)  # another version
    assert not t.observe(ack("a", layer="group:h"), now=100)  # another layer
    assert not t.observe(ack("a", layer="device"), now=100)
    assert t.observe(ack("a"), now=100)
    assert not t.complete(now=200)  # b has not answered
    assert t.observe(ack("b", status="unchanged"), now=200)
    assert not t.complete(now=100.5)  # settling: b appeared at 100
    assert t.complete(now=101.5)
    assert t.ok and [r.status for r in t.table()] == ["applied", "unchanged"]


def test_rollout_counts_devices_known_only_by_their_acknowledgement() -> None:
    t = RolloutTracker("g", 5, expect_count=2, settle=0)
    assert t.observe(ack("x"), now=1)
    assert not t.complete(now=2)  # fewer devices than --expect
    t.observe(ack("y", status="rejected", reason="policy-signature-invalid", detail="bad"), now=2)
    assert t.complete(now=3)
    assert not t.ok
    row = t.rows["y"]
    assert (row.status, row.version, row.reason) == ("rejected", 5, "policy-signature-invalid: bad")


def test_rollout_marks_members_that_went_offline() -> None:
    t = RolloutTracker("g", 5, expected=["a", "b"], settle=0)
    t.observe(ack("a"), now=1)
    assert t.observe(Event("DC", "b", "", {}), now=1)
    assert not t.observe(Event("DC", "a", "", {}), now=1)  # a answered already
    assert t.complete(now=2) and not t.ok
    assert {r.device: r.status for r in t.table()} == {"a": "applied", "b": "offline"}


def test_nobody_answered_is_not_complete_nor_ok() -> None:
    t = RolloutTracker("g", 1, settle=0)
    assert not t.complete(now=10) and not t.ok


def test_prepare_layer_sets_the_target_and_checks_the_document() -> None:
    body, version = prepare_layer({"version": 4, "allowlist": [{"digest": D1}]}, "g", None)
    assert version == 4 and body["target"] == {"group": "g"}
    with pytest.raises(InputError, match="target"):
        prepare_layer({"version": 4, "target": {"group": "h"}}, "g", None)
    with pytest.raises(PolicyError, match="enforcement"):
        prepare_layer({"version": 4, "enforcement": {"mode": "audit"}}, "g", None)
    key = ec.generate_private_key(ec.SECP256R1())
    envelope, version = prepare_layer({"version": 6}, "g", key)
    verifier = PolicyVerifier.from_pem(public_key_pem(key.public_key()))
    assert version == 6 and verifier.verify(envelope)["target"] == {"group": "g"}
    assert prepare_layer(envelope, "g", None) == (envelope, 6)  # a pre-signed envelope passes as is
    with pytest.raises(InputError, match="already a signed envelope"):
        prepare_layer(envelope, "g", key)


def test_describe_event_is_one_readable_line() -> None:
    alert = Event(
        "alerts",
        "dev-1",
        "",
        {"time": "T", "verdict": "blocked", "image": "busybox", "container": {"name": "c1"}, "reason": "r"},
    )
    assert describe_event(alert).startswith("T dev-1 ALERT   blocked busybox container=c1 reason=r")
    line = describe_event(ack("dev-2", status="rejected", reason="policy-rollback"))
    assert "group:g v5 rejected" in line and "reason=policy-rollback" in line
