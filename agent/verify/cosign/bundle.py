"""Sigstore bundles (v0.1-v0.3 JSON) as cosign v3 writes them for images: a DSSE envelope holding an in-toto
statement whose subject is the image digest.

Stricter than cosign, by decision: the statement's predicateType must be cosign's signature predicate
(``https://sigstore.dev/cosign/sign/v1``); other predicate types are attestations, not signatures.
``messageSignature`` bundles are rejected: cosign signs images with DSSE, and a message signature over an
image would need an artifact digest convention cosign does not define for images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.core.digest import Digest
from agent.errors import Code, VerificationError
from agent.verify.cosign.encoding import DecodeError, b64decode_strict, parse_json
from agent.verify.cosign.payload import check_repository

BUNDLE_MEDIA_TYPES = {
    "application/vnd.dev.sigstore.bundle+json;version=0.1": "0.1",
    "application/vnd.dev.sigstore.bundle+json;version=0.2": "0.2",
    "application/vnd.dev.sigstore.bundle+json;version=0.3": "0.3",
    "application/vnd.dev.sigstore.bundle.v0.3+json": "0.3",
}
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPES = ("https://in-toto.io/Statement/v1", "https://in-toto.io/Statement/v0.1")
COSIGN_SIGN_PREDICATE = "https://sigstore.dev/cosign/sign/v1"
MAX_BUNDLE_BYTES = 4 * 1024 * 1024
MAX_CERTIFICATES = 10
MAX_TLOG_ENTRIES = 16


def _fail(message: str) -> VerificationError:
    return VerificationError(message, code=Code.BUNDLE_INVALID)


@dataclass(frozen=True)
class DsseEnvelope:
    payload_type: str
    payload: bytes
    signature: bytes
    keyid: str = ""


@dataclass(frozen=True)
class Bundle:
    media_type: str
    version: str
    #: DER certificates, leaf first (``certificate`` or ``x509CertificateChain``); empty with a public key
    certificates: tuple[bytes, ...]
    public_key_hint: str | None
    tlog_entries: tuple[Any, ...]
    envelope: DsseEnvelope | None
    #: "dsse-envelope" or "message-signature"
    content: str


def _b64(value: Any, what: str) -> bytes:
    try:
        return b64decode_strict(value)
    except DecodeError as exc:
        raise _fail(f"{what}: {exc}") from None


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(f"{what} must be a JSON object")
    return value


def _certificates(material: dict[str, Any]) -> tuple[tuple[bytes, ...], str | None]:
    if "certificate" in material:
        return (
            _b64(_obj(material["certificate"], "certificate").get("rawBytes"), "certificate.rawBytes"),
        ), None
    if "x509CertificateChain" in material:
        certs = _obj(material["x509CertificateChain"], "x509CertificateChain").get("certificates")
        if not isinstance(certs, list) or not 1 <= len(certs) <= MAX_CERTIFICATES:
            raise _fail(f"x509CertificateChain.certificates must list 1 to {MAX_CERTIFICATES} certificates")
        return tuple(
            _b64(_obj(c, "certificate").get("rawBytes"), "certificate.rawBytes") for c in certs
        ), None
    if "publicKey" in material:
        hint = _obj(material["publicKey"], "publicKey").get("hint")
        return (), hint if isinstance(hint, str) else None
    raise _fail("verificationMaterial has no certificate, x509CertificateChain or publicKey")


def _envelope(doc: dict[str, Any]) -> DsseEnvelope:
    env = _obj(doc, "dsseEnvelope")
    payload_type = env.get("payloadType")
    if not isinstance(payload_type, str):
        raise _fail("dsseEnvelope.payloadType must be a string")
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or len(sigs) != 1:
        found = len(sigs) if isinstance(sigs, list) else 0
        raise _fail(f"dsseEnvelope must hold exactly one signature, found {found}")
    sig = _obj(sigs[0], "dsseEnvelope.signatures[0]")
    keyid = sig.get("keyid", "")
    return DsseEnvelope(
        payload_type=payload_type,
        payload=_b64(env.get("payload"), "dsseEnvelope.payload"),
        signature=_b64(sig.get("sig"), "dsseEnvelope.signatures[0].sig"),
        keyid=keyid if isinstance(keyid, str) else "",
    )


def parse_bundle(data: bytes) -> Bundle:
    """Parse bundle JSON bytes; raises VerificationError (code bundle-invalid) on anything malformed."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise _fail(f"bundle is {len(data)} bytes; at most {MAX_BUNDLE_BYTES} are accepted")
    try:
        doc = _obj(parse_json(data), "bundle")
    except DecodeError as exc:
        raise _fail(f"bundle: {exc}") from None
    media_type = doc.get("mediaType")
    if not isinstance(media_type, str) or media_type not in BUNDLE_MEDIA_TYPES:
        raise _fail(f"unsupported bundle mediaType {str(media_type)[:100]!r}")
    material = _obj(doc.get("verificationMaterial"), "verificationMaterial")
    certificates, hint = _certificates(material)
    entries = material.get("tlogEntries", [])
    if not isinstance(entries, list) or len(entries) > MAX_TLOG_ENTRIES:
        raise _fail(f"tlogEntries must be a list of at most {MAX_TLOG_ENTRIES} entries")
    has_dsse, has_message = "dsseEnvelope" in doc, "messageSignature" in doc
    if has_dsse == has_message:
        raise _fail("bundle must hold exactly one of dsseEnvelope and messageSignature")
    return Bundle(
        media_type=str(media_type),
        version=BUNDLE_MEDIA_TYPES[str(media_type)],
        certificates=certificates,
        public_key_hint=hint,
        tlog_entries=tuple(entries),
        envelope=_envelope(doc["dsseEnvelope"]) if has_dsse else None,
        content="dsse-envelope" if has_dsse else "message-signature",
    )


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what the envelope's signature covers."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


@dataclass(frozen=True)
class Statement:
    predicate_type: str
    subject_digests: tuple[str, ...]
    subject_names: tuple[str, ...]


def check_statement(
    envelope: DsseEnvelope, expected: Digest, *, repository: str | None = None, strict_identity: bool = False
) -> Statement:
    """The envelope must carry a cosign signature statement naming ``expected``; raises VerificationError."""
    if envelope.payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise _fail(f"DSSE payloadType is {envelope.payload_type[:100]!r}, expected {IN_TOTO_PAYLOAD_TYPE!r}")
    try:
        doc = _obj(parse_json(envelope.payload), "in-toto statement")
    except DecodeError as exc:
        raise VerificationError(f"in-toto statement: {exc}", code=Code.PAYLOAD_INVALID) from None
    if doc.get("_type") not in STATEMENT_TYPES:
        raise VerificationError(
            f"statement _type is {str(doc.get('_type'))[:100]!r}", code=Code.PAYLOAD_INVALID
        )
    predicate_type = doc.get("predicateType")
    if predicate_type != COSIGN_SIGN_PREDICATE:
        raise VerificationError(
            f"statement predicateType is {str(predicate_type)[:100]!r}, expected {COSIGN_SIGN_PREDICATE!r} "
            "(other predicate types are attestations, not signatures)",
            code=Code.PAYLOAD_INVALID,
        )
    subjects = doc.get("subject")
    if not isinstance(subjects, list):
        raise VerificationError("statement has no subject list", code=Code.PAYLOAD_INVALID)
    digests: list[str] = []
    names: list[str] = []
    for s in subjects:
        if isinstance(s, dict):
            d = s.get("digest")
            if isinstance(d, dict) and isinstance(d.get("sha256"), str):
                digests.append(d["sha256"])
            if isinstance(s.get("name"), str):
                names.append(s["name"])
    if expected.hex not in digests:
        found = ", ".join(f"sha256:{d[:64]}" for d in digests[:5]) or "none"
        raise VerificationError(
            f"statement subjects name {found}, expected {expected}", code=Code.DIGEST_MISMATCH
        )
    if strict_identity:
        _check_names(names, repository)
    return Statement(str(predicate_type), tuple(digests), tuple(names))


def _check_names(names: Sequence[str], repository: str | None) -> None:
    if not names:
        check_repository(None, repository)
    errors = []
    for name in names:
        try:
            check_repository(name, repository)
            return
        except VerificationError as exc:
            errors.append(exc)
    raise errors[0]
