"""Signed policy end to end: agents provisioned with ``mqtt.policy_signing_key`` accept only signed, correctly
targeted, newer whole layer documents, over request/response (PUT policy) and as fleet layers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.adapters.mqtt.codec import PayloadCodec
from agent.adapters.mqtt.kurapayload import KuraMessage
from agent.verify.cosign.keys import PrivateKey, encrypt_private_key, public_key_pem
from agent.verify.policy_signature import sign_policy
from tests.support.cloud import ACCOUNT
from tests.support.fixtures.docker import OTHER
from tests.support.fixtures.mosquitto import MqttProbe
from tests.support.fleet import Fleet, statuses

pytestmark = pytest.mark.integration


def _pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture
def signer(tmp_path: Path) -> tuple[PrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "policy.pub").write_bytes(public_key_pem(key.public_key()))
    path = tmp_path / "policy.key"
    path.write_bytes(_pem(key))
    return key, path


def test_signed_device_layer_over_put_policy(
    fleet: Fleet,
    signer: tuple[PrivateKey, Path],
    busybox_images: dict[str, str],
    mqtt_probe_factory: Callable[..., MqttProbe],
) -> None:
    key, _ = signer
    fleet.start(("sig-1", [], "audit"), policy_signing_key=str(fleet.tmp / "policy.pub"))
    probe = mqtt_probe_factory(fleet.broker, client_id="telemetry")
    probe.subscribe(f"{ACCOUNT}/sig-1/CONTAINER-AUTH-V1/policy")
    other = busybox_images[OTHER]

    def doc(version: int, device: str = "sig-1") -> dict[str, Any]:
        return {"version": version, "target": {"device": device}, "allowlist": [{"digest": other}]}

    forged = sign_policy(doc(3), key)
    forged["document"]["allowlist"].append({"digest": "sha256:" + "e" * 64})
    attacker = ed25519.Ed25519PrivateKey.generate()
    refused: list[tuple[str, Any, int, str]] = [
        ("unsigned", doc(3), 403, "not signed"),
        ("forged", forged, 403, "does not verify"),
        ("other key", sign_policy(doc(3), attacker), 403, "trusts only key"),
        ("for another device", sign_policy(doc(3, "sig-2"), key), 403, "at /target"),
        ("not an envelope", {"signature": "x", "document": 1}, 400, "'key_id' is a required property"),
    ]
    for what, body, status, text in refused:
        code, message = fleet.request("sig-1", "PUT", "policy", body)
        assert (code, text in str(message)) == (status, True), (what, code, message)
    assert fleet.request("sig-1", "GET", "policy")[1]["version"] == 0

    code, result = fleet.request("sig-1", "PUT", "policy", sign_policy(doc(3), key))
    assert (code, result["status"], result["version"]) == (200, "applied", 3)
    code, result = fleet.request("sig-1", "PUT", "policy", sign_policy(doc(3), key))
    assert (code, result["status"]) == (200, "unchanged")
    code, message = fleet.request("sig-1", "PUT", "policy", sign_policy(doc(2), key))  # rollback
    assert code == 400 and "older than the held version 3" in message
    held = fleet.request("sig-1", "GET", "policy")[1]
    assert held["version"] == 3 and held["allowlist"] == [{"digest": other}]

    # piecemeal changes need a signed whole document
    for method, resource, body in [
        ("POST", "allowlist", {"digests": [other]}),
        ("DEL", f"allowlist/{other}", None),
        ("PUT", "enforcement", {"mode": "enforce"}),
        ("DEL", "trust-anchors/x", None),
    ]:
        code, message = fleet.request("sig-1", method, resource, body)
        assert code == 403 and "a signed whole layer document is required" in message, (method, message)
    # every refused or applied document was reported on .../policy telemetry, in order
    reported = [(a["status"], a["version"], a.get("reason")) for a in _acks(probe, 8)]
    assert reported == [
        ("rejected", 3, "policy-unsigned"),
        ("rejected", 3, "policy-signature-invalid"),
        ("rejected", 3, "policy-unknown-key"),
        ("rejected", 3, "policy-wrong-target"),
        ("rejected", -1, "schema-violation"),
        ("applied", 3, None),
        ("unchanged", 3, None),
        ("rejected", 2, "policy-rollback"),
    ]


def test_signed_fleet_layer(
    fleet: Fleet,
    signer: tuple[PrivateKey, Path],
    mqtt_probe_factory: Callable[..., MqttProbe],
) -> None:
    key, key_path = signer
    pub = str(fleet.tmp / "policy.pub")
    fleet.start(("sig-a", ["secure"], "audit"), ("sig-b", ["secure"], "audit"), policy_signing_key=pub)
    # --force: the same version is published again on purpose, to see each refusal on the devices
    expect = ("--device", "sig-a", "--device", "sig-b", "--timeout", "20", "--force")

    code, report = fleet.rollout("secure", {"version": 2}, *expect)  # unsigned
    assert code == 1
    assert {d: (s, r.split(":")[0]) for d, (s, _, r) in statuses(report).items()} == {
        "sig-a": ("rejected", "policy-unsigned"),
        "sig-b": ("rejected", "policy-unsigned"),
    }

    # signed by a key the devices do not trust (an encrypted cosign.key, to exercise --passphrase-file)
    wrong = fleet.tmp / "wrong.key"
    wrong.write_bytes(encrypt_private_key(ec.generate_private_key(ec.SECP256R1()), "pw"))
    (fleet.tmp / "pass").write_text("pw\n")
    code, report = fleet.rollout(
        "secure",
        {"version": 2},
        "--sign-key",
        str(wrong),
        "--passphrase-file",
        str(fleet.tmp / "pass"),
        *expect,
    )
    assert code == 1 and all(r["reason"].startswith("policy-unknown-key") for r in report["devices"]), report

    # a document validly signed for another group, replayed on this group's topic
    replay = sign_policy({"version": 2, "target": {"group": "other"}}, key)
    probe = mqtt_probe_factory(fleet.broker, client_id="replayer")
    probe.subscribe(f"{ACCOUNT}/+/CONTAINER-AUTH-V1/policy")
    payload = PayloadCodec().encode(KuraMessage(1, {}, json.dumps(replay).encode()))
    probe.publish(f"$EDC/{ACCOUNT}/fleet/secure/CONTAINER-AUTH-V1/policy", payload)
    seen = _acks(probe, 2)
    assert {a["device"]: (a["status"], a["reason"]) for a in seen} == {
        "sig-a": ("rejected", "policy-wrong-target"),
        "sig-b": ("rejected", "policy-wrong-target"),
    }

    # the right document, signed with the provisioned key: applied by both
    code, report = fleet.rollout(
        "secure",
        {"version": 2, "allowlist": [{"digest": "sha256:" + "a" * 64}]},
        "--sign-key",
        str(key_path),
        *expect,
    )
    assert code == 0 and statuses(report) == {"sig-a": ("applied", 2, ""), "sig-b": ("applied", 2, "")}

    # rolled back: an older, validly signed document is refused and the layer stays at 2
    older = sign_policy({"version": 1, "target": {"group": "secure"}}, key)
    code, report = fleet.rollout("secure", older, *expect)
    assert code == 1 and all(r["reason"].startswith("policy-rollback") for r in report["devices"]), report
    for device in ("sig-a", "sig-b"):
        held = fleet.request(device, "GET", "policy", {"layer": "group:secure"})[1]
        assert held["version"] == 2 and held["target"] == {"group": "secure"}


def _acks(probe: MqttProbe, count: int) -> list[dict[str, Any]]:
    out = []
    while len(out) < count:
        msg = probe.expect(timeout=15)
        decoded = PayloadCodec().decode(bytes(msg.payload))
        out.append(json.loads(decoded.body or b"{}"))
    return out
