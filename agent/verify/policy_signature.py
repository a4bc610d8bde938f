"""Signed policy layers: the envelope, signing (console side) and the gate every MQTT policy change passes.

With ``mqtt.policy_signing_key`` (a PEM public key set at provisioning) every policy change that arrives over
MQTT must be a whole layer document inside an envelope (``schemas/signed-policy.schema.json``)::

    {"document": {"version": 7, "target": {"device": "dev-1"}, "allowlist": [...], ...},
     "signature": "<base64>", "key_id": "<hex sha256 of the signer's SubjectPublicKeyInfo DER>",
     "algorithm": "ecdsa-p256-sha256" | "ecdsa-p384-sha384" | "ed25519"}

The signature covers the RFC 8785 canonical JSON of ``document``, so any JSON serialiser can produce it. The
document names its target (``{"device": id}`` or ``{"group": name}``), so a document signed for one device
or group is refused by every other, and its version, so an older one is refused as a rollback (by the policy
service; an equal one is "nothing new"). The key is never taken from MQTT: no resource reads or writes it.

Checks raise; the control plane decides what a failure means (403 reply, rejection telemetry). Nothing here
does I/O except :meth:`PolicyVerifier.from_file`.
"""

from __future__ import annotations

import binascii
import datetime as dt
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.core.envelope import ENVELOPE_SCHEMA, is_envelope
from agent.core.schemas import validate
from agent.errors import (
    Code,
    ConfigError,
    InputError,
    KeyMaterialError,
    PolicySignatureError,
    VerificationError,
)
from agent.verify.cosign.encoding import b64decode_strict, b64encode
from agent.verify.cosign.keys import (
    PrivateKey,
    PublicKey,
    key_fingerprint,
    load_public_key,
    sign,
)

#: envelope ``algorithm`` -> (curve name or "ed25519", the hash it signs with; None for Ed25519)
ALGORITHMS: dict[str, tuple[str, type[hashes.HashAlgorithm] | None]] = {
    "ecdsa-p256-sha256": ("secp256r1", hashes.SHA256),
    "ecdsa-p384-sha384": ("secp384r1", hashes.SHA384),
    "ed25519": ("ed25519", None),
}


def _verify_exactly(key: PublicKey, algorithm: str, payload: bytes, signature: bytes) -> None:
    """Verify with the one algorithm the envelope names (no fallback hash: a P-384 key signs with SHA-384)."""
    digest = ALGORITHMS[algorithm][1]
    try:
        if isinstance(key, ed25519.Ed25519PublicKey) and digest is None:
            key.verify(signature, payload)
            return
        if isinstance(key, ec.EllipticCurvePublicKey) and digest is not None:
            key.verify(signature, payload, ec.ECDSA(digest()))
            return
    except InvalidSignature:
        raise VerificationError(
            f"{algorithm} signature does not verify", code=Code.SIGNATURE_MISMATCH
        ) from None
    raise VerificationError(f"the key cannot verify {algorithm}", code=Code.UNSUPPORTED_KEY)


def algorithm_for(key: PublicKey) -> str:
    """The envelope algorithm a key signs with; KeyMaterialError for keys policy signing does not support."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePublicKey):
        for name, (curve, _) in ALGORITHMS.items():
            if curve == key.curve.name:
                return name
    raise KeyMaterialError(
        f"policy signing key: unsupported key type ({_describe(key)}); use ECDSA P-256, P-384 or Ed25519"
    )


def _describe(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    return type(key).__name__


def canonical_bytes(document: Any) -> bytes:
    """RFC 8785 (JCS) canonical JSON: the exact bytes a policy signature covers."""
    try:
        return rfc8785.dumps(document)
    except rfc8785.CanonicalizationError as exc:
        raise InputError(f"policy document cannot be canonicalised (RFC 8785): {exc}") from None


def check_expiry(document: Mapping[str, Any], what: str, now: float) -> None:
    """A signed document past its ``expires`` is refused (the device clock decides; no network needed)."""
    text = document.get("expires")
    if text is None:
        return
    try:
        expires = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise PolicySignatureError(
            f"{what}: at /document/expires: {text!r} is not an RFC 3339 time", code=Code.POLICY_EXPIRED
        ) from None
    if expires.tzinfo is None:
        raise PolicySignatureError(f"{what}: at /document/expires: no time zone", code=Code.POLICY_EXPIRED)
    if expires.timestamp() <= now:
        raise PolicySignatureError(
            f"{what}: the signed document expired at {text} (device time "
            f"{dt.datetime.fromtimestamp(now, dt.UTC):%Y-%m-%dT%H:%M:%SZ}); sign it again with a later expiry",
            code=Code.POLICY_EXPIRED,
        )


def sign_policy(document: Mapping[str, Any], private_key: PrivateKey) -> dict[str, Any]:
    """Wrap a layer document in a signed envelope. The document must be valid and name version and target."""
    doc = dict(document)
    validate(doc, "policy", "policy document")
    if "target" not in doc:
        raise InputError(
            'policy document: a signed document must name its target: {"device": ID} or {"group": NAME}'
        )
    public = private_key.public_key()
    algorithm = algorithm_for(public)
    signature = sign(canonical_bytes(doc), private_key)
    return {
        "document": doc,
        "signature": b64encode(signature),
        "key_id": key_fingerprint(public),
        "algorithm": algorithm,
    }


@dataclass(frozen=True)
class PolicyVerifier:
    """The provisioned policy-signing public key and the check of an envelope against it."""

    key: PublicKey
    key_id: str
    algorithm: str
    #: the device clock, for ``expires``
    clock: Callable[[], float] = time.time

    @classmethod
    def from_pem(cls, pem: str | bytes, what: str = "policy signing key") -> PolicyVerifier:
        key = load_public_key(pem, what)
        return cls(key=key, key_id=key_fingerprint(key), algorithm=algorithm_for(key))

    @classmethod
    def from_file(cls, path: Path) -> PolicyVerifier:
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"mqtt.policy_signing_key {path}: cannot read: {exc.strerror}") from None
        return cls.from_pem(pem, f"mqtt.policy_signing_key {path}")

    def verify(self, envelope: Any, what: str = "signed policy") -> dict[str, Any]:
        """The signed document if ``envelope`` is signed by this key, else PolicySignatureError (403).

        A body that is not an envelope at all is "unsigned" (403); an envelope of the wrong shape fails its
        schema (SchemaError, 400).
        """
        if not is_envelope(envelope):
            raise PolicySignatureError(
                f"{what}: the document is not signed; this device requires a signed envelope "
                '{"document", "signature", "key_id", "algorithm"} (see imageguard console sign-policy)',
                code=Code.POLICY_UNSIGNED,
            )
        validate(envelope, ENVELOPE_SCHEMA, what)
        if envelope["key_id"] != self.key_id:
            raise PolicySignatureError(
                f"{what}: signed by key {envelope['key_id'][:16]}, but this device trusts only key "
                f"{self.key_id[:16]}",
                code=Code.POLICY_UNKNOWN_KEY,
            )
        if envelope["algorithm"] != self.algorithm:
            raise PolicySignatureError(
                f"{what}: algorithm {envelope['algorithm']!r} does not match the device's key "
                f"({self.algorithm})",
                code=Code.POLICY_SIGNATURE_INVALID,
            )
        try:
            signature = b64decode_strict(envelope["signature"])
        except (ValueError, binascii.Error):
            raise PolicySignatureError(
                f"{what}: signature is not valid base64", code=Code.POLICY_SIGNATURE_INVALID
            ) from None
        document = envelope["document"]
        try:
            _verify_exactly(self.key, self.algorithm, canonical_bytes(document), signature)
        except VerificationError as exc:
            raise PolicySignatureError(
                f"{what}: signature does not verify: {exc}", code=Code.POLICY_SIGNATURE_INVALID
            ) from None
        check_expiry(document, what, self.clock())
        return dict(document)
