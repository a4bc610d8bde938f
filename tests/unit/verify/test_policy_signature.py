"""Signed policy: the envelope, signing, verification, target checks and the gate of MQTT policy changes."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agent.config import from_dict
from agent.control.gate import PolicyGate
from agent.core.digest import Digest
from agent.core.envelope import claimed_version, is_envelope, target_for_layer
from agent.errors import (
    ConfigError,
    InputError,
    KeyMaterialError,
    PolicyError,
    PolicySignatureError,
    SchemaError,
)
from agent.verify.cosign.keys import PrivateKey, public_key_pem
from agent.verify.policy_signature import PolicyVerifier, canonical_bytes, sign_policy

D1 = str(Digest.of(b"one"))
KEYS: dict[str, Callable[[], PrivateKey]] = {
    "ecdsa-p256-sha256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ecdsa-p384-sha384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


def doc(version: int = 3, target: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"version": version, "target": target or {"device": "dev-1"}}
    d["allowlist"] = [{"digest": D1, "comment": "fleet image"}]
    d.update(extra)
    return d


def verifier_for(key: PrivateKey) -> PolicyVerifier:
    return PolicyVerifier.from_pem(public_key_pem(key.public_key()))


@pytest.fixture(scope="module")
def p256() -> PrivateKey:
    return KEYS["ecdsa-p256-sha256"]()


@pytest.mark.parametrize("algorithm", sorted(KEYS))
def test_sign_then_verify_each_algorithm(algorithm: str) -> None:
    key = KEYS[algorithm]()
    envelope = sign_policy(doc(), key)
    assert envelope["algorithm"] == algorithm
    assert len(envelope["key_id"]) == 64
    assert verifier_for(key).verify(envelope) == doc()


def test_signature_covers_canonical_json_not_the_serialisation(p256: PrivateKey) -> None:
    envelope = sign_policy(doc(), p256)
    # re-serialised with other key order and whitespace, as any JSON tool might: still the same document
    reordered = json.loads(json.dumps(envelope, indent=3, sort_keys=False))
    reordered["document"] = dict(reversed(list(reordered["document"].items())))
    assert verifier_for(p256).verify(reordered)["version"] == 3
    assert canonical_bytes({"b": 1, "a": [2.0]}) == b'{"a":[2],"b":1}'


def _forged(env: dict[str, Any]) -> dict[str, Any]:
    env["document"]["allowlist"].append({"digest": str(Digest.of(b"evil"))})
    return env


def _version_bumped(env: dict[str, Any]) -> dict[str, Any]:
    env["document"]["version"] = 99
    return env


def _retargeted(env: dict[str, Any]) -> dict[str, Any]:
    env["document"]["target"] = {"device": "dev-2"}
    return env


def _truncated_signature(env: dict[str, Any]) -> dict[str, Any]:
    sig = base64.b64decode(env["signature"])
    env["signature"] = base64.b64encode(sig[:-2]).decode()
    return env


def _bad_base64(env: dict[str, Any]) -> dict[str, Any]:
    env["signature"] = "not*base64"
    return env


def _other_key_id(env: dict[str, Any]) -> dict[str, Any]:
    env["key_id"] = "0" * 64
    return env


def _wrong_algorithm(env: dict[str, Any]) -> dict[str, Any]:
    env["algorithm"] = "ed25519"
    return env


@pytest.mark.parametrize(
    ("tamper", "code"),
    [
        (_forged, "policy-signature-invalid"),
        (_version_bumped, "policy-signature-invalid"),
        (_retargeted, "policy-signature-invalid"),
        (_truncated_signature, "policy-signature-invalid"),
        (_bad_base64, "policy-signature-invalid"),
        (_other_key_id, "policy-unknown-key"),
        (_wrong_algorithm, "policy-signature-invalid"),
    ],
)
def test_tampered_envelopes_are_refused_with_403(
    p256: PrivateKey, tamper: Callable[[dict[str, Any]], dict[str, Any]], code: str
) -> None:
    envelope = tamper(json.loads(json.dumps(sign_policy(doc(), p256))))
    with pytest.raises(PolicySignatureError) as err:
        verifier_for(p256).verify(envelope)
    assert err.value.code == code
    assert err.value.status == 403


def test_signed_by_another_key_claiming_ours_is_refused(p256: PrivateKey) -> None:
    attacker = KEYS["ecdsa-p256-sha256"]()
    envelope = sign_policy(doc(), attacker)
    envelope["key_id"] = verifier_for(p256).key_id  # claim the trusted key
    with pytest.raises(PolicySignatureError, match="does not verify") as err:
        verifier_for(p256).verify(envelope)
    assert err.value.code == "policy-signature-invalid"


def test_p384_signature_with_sha256_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    envelope = sign_policy(doc(), key)
    weak = key.sign(canonical_bytes(envelope["document"]), ec.ECDSA(hashes.SHA256()))
    envelope["signature"] = base64.b64encode(weak).decode()
    with pytest.raises(PolicySignatureError, match="ecdsa-p384-sha384 signature does not verify"):
        verifier_for(key).verify(envelope)


def test_unsigned_document_is_refused_when_signing_is_on(p256: PrivateKey) -> None:
    with pytest.raises(PolicySignatureError) as err:
        verifier_for(p256).verify(doc())
    assert err.value.code == "policy-unsigned"


@pytest.mark.parametrize(
    ("change", "pointer"),
    [
        (lambda e: e.pop("key_id"), "/key_id"),
        (lambda e: e.update(extra=1), "/extra"),
        (lambda e: e.update(key_id="ABC"), "/key_id"),
        (lambda e: e.update(algorithm="rsa"), "/algorithm"),
        (lambda e: e["document"].pop("target"), "/document/target"),
    ],
)
def test_malformed_envelope_fails_its_schema(
    p256: PrivateKey, change: Callable[[dict[str, Any]], object], pointer: str
) -> None:
    envelope = sign_policy(doc(), p256)
    change(envelope)
    with pytest.raises(SchemaError) as err:
        verifier_for(p256).verify(envelope)
    assert err.value.pointer == pointer


def test_sign_policy_requires_a_valid_targeted_document(p256: PrivateKey) -> None:
    with pytest.raises(InputError, match="must name its target"):
        sign_policy({"version": 1}, p256)
    with pytest.raises(SchemaError, match="/allowlist/0"):
        sign_policy({"version": 1, "target": {"group": "g"}, "allowlist": [{"nope": 1}]}, p256)


@pytest.mark.parametrize(
    "make",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        lambda: ec.generate_private_key(ec.SECP521R1()),
    ],
)
def test_unsupported_keys_are_refused(make: Callable[[], PrivateKey]) -> None:
    key = make()
    with pytest.raises(KeyMaterialError, match="P-256, P-384 or Ed25519"):
        verifier_for(key)
    with pytest.raises(KeyMaterialError):
        sign_policy(doc(), key)


def test_verifier_from_file(tmp_path: Path, p256: PrivateKey) -> None:
    path = tmp_path / "policy.pub"
    with pytest.raises(ConfigError, match="cannot read"):
        PolicyVerifier.from_file(path)
    path.write_text("garbage")
    with pytest.raises(KeyMaterialError, match="no PEM block"):
        PolicyVerifier.from_file(path)
    path.write_bytes(public_key_pem(p256.public_key()))
    assert PolicyVerifier.from_file(path).key_id == verifier_for(p256).key_id


# --- the gate --------------------------------------------------------------------------------------------


def test_gate_with_signing_accepts_only_signed_targeted_documents(p256: PrivateKey) -> None:
    gate = PolicyGate("dev-1", verifier_for(p256))
    layer = gate.accept(sign_policy(doc(version=5), p256))
    assert (layer.name, layer.version, [str(e.digest) for e in layer.allowlist]) == ("device", 5, [D1])
    group = gate.accept(sign_policy(doc(target={"group": "plant-a"}), p256), "group:plant-a")
    assert group.name == "group:plant-a"
    table: list[tuple[Any, str, str]] = [
        (doc(), "device", "policy-unsigned"),
        (sign_policy(doc(target={"device": "dev-2"}), p256), "device", "policy-wrong-target"),
        (sign_policy(doc(target={"group": "plant-a"}), p256), "device", "policy-wrong-target"),
        (sign_policy(doc(target={"group": "plant-b"}), p256), "group:plant-a", "policy-wrong-target"),
        (sign_policy(doc(target={"device": "dev-1"}), p256), "group:plant-a", "policy-wrong-target"),
    ]
    for body, layer_name, code in table:
        with pytest.raises(PolicySignatureError) as err:
            gate.accept(body, layer_name)
        assert err.value.code == code, (body, layer_name)
    with pytest.raises(PolicySignatureError, match="a signed whole layer document is required") as err:
        gate.require_whole_document("POST allowlist")
    assert err.value.status == 403 and err.value.code == "signed-document-required"


def test_gate_without_a_key_refuses_every_change_by_default(p256: PrivateKey) -> None:
    gate = PolicyGate("dev-1")
    assert gate.signing_required
    for attempt in (
        lambda: gate.require_whole_document("POST allowlist"),
        lambda: gate.accept({"version": 2}),
        lambda: gate.accept(sign_policy(doc(version=4), p256)),  # signed, but by whom? no key to tell
    ):
        with pytest.raises(PolicySignatureError, match="no policy-signing key is provisioned") as err:
            attempt()
        assert err.value.code == "signed-document-required"


def test_gate_allowing_unsigned_accepts_bare_and_enveloped_documents(p256: PrivateKey) -> None:
    gate = PolicyGate("dev-1", allow_unsigned=True)
    gate.require_whole_document("POST allowlist")  # piecemeal changes are fine when unsigned is allowed
    assert gate.accept({"version": 2}).version == 2
    assert gate.accept(sign_policy(doc(version=4), p256)).version == 4
    with pytest.raises(PolicyError, match="at /target: the document is for") as err:
        gate.accept(doc(target={"device": "dev-9"}))
    assert not isinstance(err.value, PolicySignatureError)  # 400 without signing, 403 with
    with pytest.raises(InputError, match="JSON object"):
        gate.accept([1, 2])


def test_gate_from_config(tmp_path: Path, p256: PrivateKey) -> None:
    (tmp_path / "policy.pub").write_bytes(public_key_pem(p256.public_key()))
    base = {"device": {"id": "dev-1"}, "mqtt": {"url": "mqtt://127.0.0.1:1"}}
    assert PolicyGate.from_config(from_dict(base, "t", tmp_path)).signing_required  # the default
    opted_out = dict(base, mqtt={"url": "mqtt://127.0.0.1:1", "allow_unsigned_policy": True})
    assert not PolicyGate.from_config(from_dict(opted_out, "t", tmp_path)).signing_required
    signed = dict(base, mqtt={"url": "mqtt://127.0.0.1:1", "policy_signing_key": "policy.pub"})
    gate = PolicyGate.from_config(from_dict(signed, "t", tmp_path))
    assert gate.signing_required and gate.device_id == "dev-1"


def test_helpers(p256: PrivateKey) -> None:
    envelope = sign_policy(doc(version=8), p256)
    assert is_envelope(envelope) and not is_envelope(doc())
    assert claimed_version(envelope) == 8 and claimed_version(doc(version=2)) == 2
    assert claimed_version({"version": True}) is None and claimed_version("x") is None
    assert target_for_layer("device", "d") == {"device": "d"}
    assert target_for_layer("group:g", "d") == {"group": "g"}
    with pytest.raises(InputError):
        target_for_layer("group:", "d")


# -- expiry ------------------------------------------------------------------------------------------


def test_a_signed_document_past_its_expiry_is_refused_offline(p256: PrivateKey) -> None:
    import dataclasses
    import datetime as dt

    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp()
    verifier = dataclasses.replace(verifier_for(p256), clock=lambda: now)
    fresh = sign_policy(doc(expires="2026-12-02T00:00:00Z"), p256)
    stale = sign_policy(doc(expires="2026-11-30T23:59:59Z"), p256)
    assert verifier.verify(fresh)["expires"] == "2026-12-02T00:00:00Z"
    with pytest.raises(PolicySignatureError, match="expired at 2026-11-30T23:59:59Z") as err:
        verifier.verify(stale)
    assert err.value.code == "policy-expired" and err.value.status == 403
    # the expiry is signed: moving it changes what the signature covers
    moved = {**stale, "document": {**stale["document"], "expires": "2027-01-01T00:00:00Z"}}
    with pytest.raises(PolicySignatureError) as err:
        verifier.verify(moved)
    assert err.value.code == "policy-signature-invalid"
    # and it is part of a layer document the policy schema accepts
    assert PolicyGate("dev-1", verifier).accept(fresh).version == 3
