"""Verify an image's cosign signatures under one trust anchor: the single entry point of this package.

Every signature is checked on its own (as ``cosign verify`` does); the image is verified when any one
passes. A failure names, per signature, where it came from and what was expected versus found, with a
stable reason code:

    malformed-signature  annotation/bundle missing or not decodable
    bundle-invalid       Sigstore bundle not in a supported shape
    unsupported-key      the signing certificate holds a key cosign does not accept
    signature-mismatch   the signature does not verify with the anchor's key / the certificate's key
    payload-invalid      the signed payload is not a cosign image signature
    digest-mismatch      the payload signs another image digest
    identity-mismatch    docker-reference (strict_identity) or certificate identity does not match
    certificate-*        untrusted, expired (at the signing time) or wrong EKU certificate
    tlog-invalid         Rekor evidence present but wrong (forged SET, other log, other signature)
    tlog-required        the anchor requires a verified Rekor entry and this signature has none
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.core.anchors import TrustAnchor
from agent.core.digest import Digest
from agent.errors import Code, KeyMaterialError, VerificationError
from agent.verify.cosign import bundle as bundles
from agent.verify.cosign.artifacts import (
    ANN_BUNDLE,
    ANN_CERTIFICATE,
    ANN_CHAIN,
    ANN_SIGNATURE,
    BUNDLE_MEDIA_TYPE_PREFIX,
    SIMPLE_SIGNING_MEDIA_TYPE,
    BundleSignature,
    LegacySignature,
    SignatureArtifact,
    SignatureSet,
)
from agent.verify.cosign.certs import (
    CertificateFormatError,
    check_identities,
    parse_der_certificate,
    parse_pem_certificates,
    verify_path,
)
from agent.verify.cosign.encoding import DecodeError, b64decode_strict
from agent.verify.cosign.keys import (
    PublicKey,
    check_key,
    describe_key,
    key_fingerprint,
    load_public_keys,
    spki_der,
    verify_signature,
)
from agent.verify.cosign.payload import check_claims
from agent.verify.cosign.rekor import (
    RekorKey,
    Signer,
    TlogEntry,
    load_rekor_key,
    verify_bundle_entry,
    verify_legacy_bundle,
)

MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_ANNOTATION_BYTES = 1024 * 1024
#: more signatures than this are reported as not tried: bounded time per image
MAX_SIGNATURES = 128


@dataclass(frozen=True)
class AnchorMaterial:
    """A trust anchor's PEM texts, parsed once."""

    anchor: TrustAnchor
    keys: tuple[PublicKey, ...] = ()
    roots: tuple[x509.Certificate, ...] = ()
    intermediates: tuple[x509.Certificate, ...] = ()
    rekor: RekorKey | None = None


def prepare_anchor(anchor: TrustAnchor) -> AnchorMaterial:
    """Parse an anchor's key/roots/intermediates/Rekor key; KeyMaterialError names what is wrong.

    Policy loading can call this to reject a bad anchor up-front instead of at verification time.
    """
    where = f"trust anchor {anchor.name!r}"
    rekor = (
        load_rekor_key(anchor.rekor_public_key, f"{where}: rekor_public_key")
        if anchor.rekor_public_key
        else None
    )
    if anchor.kind == "key":
        return AnchorMaterial(anchor, keys=tuple(load_public_keys(anchor.pem, f"{where}: pem")), rekor=rekor)
    try:
        roots = parse_pem_certificates(anchor.pem)
        intermediates = parse_pem_certificates(anchor.intermediates) if anchor.intermediates else []
    except CertificateFormatError as exc:
        raise KeyMaterialError(f"{where}: {exc}") from None
    if not roots:
        raise KeyMaterialError(
            f"{where}: pem holds no CERTIFICATE; a 'ca' anchor needs its root certificate(s)"
        )
    return AnchorMaterial(anchor, roots=tuple(roots), intermediates=tuple(intermediates), rekor=rekor)


@dataclass(frozen=True)
class VerifiedSignature:
    """Proof that an image verified: which digest, under which anchor, thanks to which signature."""

    digest: Digest
    anchor: str
    origin: str
    #: the signer: key fingerprint and algorithm, or certificate identity
    description: str
    #: Rekor integrated time (Unix seconds) when a transparency-log entry was verified, else None
    signing_time: float | None
    tlog_verified: bool


@dataclass(frozen=True)
class SignatureOutcome:
    origin: str
    format: str  # "legacy" (.sig layer) or "bundle" (Sigstore bundle referrer)
    ok: bool
    code: Code  # VERIFIED or a reason code
    message: str
    signing_time: float | None = None
    tlog_verified: bool = False

    @property
    def reason(self) -> str:
        return f"{self.origin}: {self.code}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "format": self.format,
            "verified": self.ok,
            "code": self.code,
            "message": self.message,
            "signing_time": self.signing_time,
            "tlog_verified": self.tlog_verified,
        }


@dataclass(frozen=True)
class VerificationReport:
    """Per-signature results for one image and one anchor (``imageguard verify --json``)."""

    digest: Digest
    anchor: str
    outcomes: tuple[SignatureOutcome, ...]

    @property
    def verified(self) -> SignatureOutcome | None:
        return next((o for o in self.outcomes if o.ok), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest": str(self.digest),
            "anchor": self.anchor,
            "verified": self.verified is not None,
            "signatures": [o.to_dict() for o in self.outcomes],
        }


def _origin(sig: SignatureArtifact, index: int) -> str:
    return sig.origin or f"signature {index}"


def evaluate(
    digest: Digest,
    signatures: SignatureSet | Sequence[SignatureArtifact],
    anchor: TrustAnchor | AnchorMaterial,
    *,
    now: float,
    image_repository: str | None = None,
) -> VerificationReport:
    """Check every signature; never raises for bad signatures (KeyMaterialError for a bad anchor)."""
    material = anchor if isinstance(anchor, AnchorMaterial) else prepare_anchor(anchor)
    if isinstance(signatures, SignatureSet):
        image_repository = image_repository or signatures.repository or None
        sigs: Sequence[SignatureArtifact] = signatures.signatures
    else:
        sigs = signatures
    outcomes = []
    for i, sig in enumerate(sigs):
        if i >= MAX_SIGNATURES:
            outcomes.append(
                SignatureOutcome(
                    _origin(sig, i), _format(sig), False, Code.NOT_TRIED, f"only {MAX_SIGNATURES} are tried"
                )
            )
            continue
        outcomes.append(_check_one(sig, i, digest, material, now, image_repository))
    return VerificationReport(digest, material.anchor.name, tuple(outcomes))


def verify_image(
    digest: Digest,
    signatures: SignatureSet | Sequence[SignatureArtifact],
    anchor: TrustAnchor | AnchorMaterial,
    *,
    now: float,
    image_repository: str | None = None,
) -> VerifiedSignature:
    """The first signature that verifies under ``anchor``; else VerificationError with one reason each."""
    report = evaluate(digest, signatures, anchor, now=now, image_repository=image_repository)
    ok = report.verified
    if ok is not None:
        return VerifiedSignature(
            digest, report.anchor, ok.origin, ok.message, ok.signing_time, ok.tlog_verified
        )
    if not report.outcomes:
        raise VerificationError(
            f"no signatures found for {digest}; sign the image (imageguard sign / cosign sign) and push the "
            "signature to the image's repository",
            code=Code.NO_SIGNATURES,
            reasons=["no signatures found"],
        )
    codes = {o.code for o in report.outcomes}
    raise VerificationError(
        f"no signature of {digest} verifies under trust anchor {report.anchor!r} "
        f"({len(report.outcomes)} tried): {report.outcomes[0].reason}",
        code=codes.pop() if len(codes) == 1 else Code.SIGNATURE_INVALID,
        reasons=[o.reason for o in report.outcomes],
    )


def _format(sig: SignatureArtifact) -> str:
    return "bundle" if isinstance(sig, BundleSignature) else "legacy"


@dataclass(frozen=True)
class _Accepted:
    description: str
    tlog: TlogEntry | None


def _check_one(
    sig: SignatureArtifact, index: int, digest: Digest, m: AnchorMaterial, now: float, repository: str | None
) -> SignatureOutcome:
    origin, fmt = _origin(sig, index), _format(sig)
    try:
        if isinstance(sig, LegacySignature):
            accepted = _check_legacy(sig, digest, m, now, repository)
        else:
            accepted = _check_bundle(sig, digest, m, now, repository)
    except VerificationError as exc:
        message = exc.message
        if isinstance(sig, LegacySignature) and sig.media_type != SIMPLE_SIGNING_MEDIA_TYPE:
            message += f" (layer mediaType is {sig.media_type[:100]!r}, not {SIMPLE_SIGNING_MEDIA_TYPE!r})"
        return SignatureOutcome(origin, fmt, False, exc.code, message)
    t = accepted.tlog
    return SignatureOutcome(
        origin,
        fmt,
        True,
        Code.VERIFIED,
        accepted.description,
        signing_time=float(t.integrated_time) if t else None,
        tlog_verified=t is not None,
    )


def _malformed(message: str) -> VerificationError:
    return VerificationError(message, code=Code.MALFORMED_SIGNATURE)


def _annotation(sig: LegacySignature, key: str) -> str | None:
    value = sig.annotations.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_ANNOTATION_BYTES:
        raise _malformed(f"annotation {key} must be a string of at most {MAX_ANNOTATION_BYTES} characters")
    return value


def _verify_with_keys(keys: Sequence[PublicKey], data: bytes, signature: bytes) -> tuple[PublicKey, str]:
    first: VerificationError | None = None
    for key in keys:
        try:
            return key, verify_signature(key, data, signature)
        except VerificationError as exc:
            first = first or exc
    assert first is not None  # an anchor of kind key always holds at least one key
    raise first


def _signer_key(leaf: x509.Certificate) -> PublicKey:
    try:
        return check_key(leaf.public_key(), "signing certificate")
    except KeyMaterialError as exc:
        raise VerificationError(exc.message, code=Code.UNSUPPORTED_KEY) from None


def _check_tlog_required(m: AnchorMaterial, tlog: TlogEntry | None, missing: str) -> None:
    if tlog is not None or not m.anchor.require_tlog:
        return
    if m.rekor is None:
        raise VerificationError(
            "the trust anchor requires a transparency-log entry but configures no rekor_public_key",
            code=Code.TLOG_REQUIRED,
        )
    raise VerificationError(
        f"the trust anchor requires a verified transparency-log entry; {missing}", code=Code.TLOG_REQUIRED
    )


def _check_certificate(
    leaf: x509.Certificate, untrusted: Sequence[x509.Certificate], m: AnchorMaterial, at: float
) -> str:
    when = dt.datetime.fromtimestamp(at, tz=dt.UTC)
    verify_path(leaf, [*untrusted, *m.intermediates], m.roots, when)
    if not m.anchor.identities and not m.anchor.any_identity:
        # never "no identities = anyone": a CA anchor must say whom it trusts (agent/core/anchors.py)
        raise VerificationError(
            f"trust anchor {m.anchor.name!r} names no identity and does not say any_identity",
            code=Code.IDENTITY_MISMATCH,
        )
    return "certificate " + check_identities(leaf, m.anchor.identities)


def _check_legacy(
    sig: LegacySignature, digest: Digest, m: AnchorMaterial, now: float, repository: str | None
) -> _Accepted:
    if len(sig.payload) > MAX_PAYLOAD_BYTES:
        raise _malformed(f"payload is {len(sig.payload)} bytes; at most {MAX_PAYLOAD_BYTES} are accepted")
    raw_sig = _annotation(sig, ANN_SIGNATURE)
    if raw_sig is None:
        raise _malformed(f"layer has no {ANN_SIGNATURE} annotation")
    try:
        signature = b64decode_strict(raw_sig)
    except DecodeError as exc:
        raise _malformed(f"{ANN_SIGNATURE} annotation: {exc}") from None
    leaf: x509.Certificate | None = None
    untrusted: list[x509.Certificate] = []
    if m.anchor.kind == "key":
        key, algorithm = _verify_with_keys(m.keys, sig.payload, signature)
        signer = Signer(spki_der(key), is_certificate=False)
        description = f"key {key_fingerprint(key)[:16]} ({describe_key(key)}, {algorithm})"
    else:
        leaf, untrusted = _legacy_certificates(sig)
        algorithm = verify_signature(_signer_key(leaf), sig.payload, signature)
        signer = Signer(leaf.public_bytes(Encoding.DER), is_certificate=True)
        description = algorithm
    check_claims(sig.payload, digest, repository=repository, strict_identity=m.anchor.strict_identity)
    tlog = None
    bundle_annotation = _annotation(sig, ANN_BUNDLE)
    if m.rekor is not None and bundle_annotation is not None:
        tlog = verify_legacy_bundle(
            bundle_annotation, m.rekor, signature=signature, payload=sig.payload, signer=signer
        )
    _check_tlog_required(m, tlog, f"the layer has no {ANN_BUNDLE} annotation")
    if leaf is not None:
        at = float(tlog.integrated_time) if tlog else now
        description = _check_certificate(leaf, untrusted, m, at) + f" ({algorithm})"
    return _Accepted(description, tlog)


def _legacy_certificates(sig: LegacySignature) -> tuple[x509.Certificate, list[x509.Certificate]]:
    leaf_pem = _annotation(sig, ANN_CERTIFICATE)
    if leaf_pem is None:
        raise _malformed(f"the trust anchor is a CA, but the layer has no {ANN_CERTIFICATE} annotation")
    chain_pem = _annotation(sig, ANN_CHAIN)
    try:
        leaves = parse_pem_certificates(leaf_pem)
        chain = parse_pem_certificates(chain_pem) if chain_pem else []
    except CertificateFormatError as exc:
        raise _malformed(f"certificate annotations: {exc}") from None
    if len(leaves) != 1:
        raise _malformed(f"{ANN_CERTIFICATE} must hold exactly one certificate, found {len(leaves)}")
    # cosign treats the chain's last certificate as its root; it is never trusted, so drop it
    return leaves[0], chain[:-1]


def _check_bundle(
    sig: BundleSignature, digest: Digest, m: AnchorMaterial, now: float, repository: str | None
) -> _Accepted:
    if not sig.media_type.startswith(BUNDLE_MEDIA_TYPE_PREFIX):
        raise VerificationError(
            f"mediaType {sig.media_type[:100]!r} is not a Sigstore bundle", code=Code.BUNDLE_INVALID
        )
    b = bundles.parse_bundle(sig.bundle)
    env = b.envelope
    if env is None:
        raise VerificationError(
            "messageSignature bundles are not cosign image signatures (cosign signs images with DSSE)",
            code=Code.BUNDLE_INVALID,
        )
    signed = bundles.pae(env.payload_type, env.payload)
    leaf: x509.Certificate | None = None
    untrusted: list[x509.Certificate] = []
    if m.anchor.kind == "key":
        key, algorithm = _verify_with_keys(m.keys, signed, env.signature)
        signer = Signer(spki_der(key), is_certificate=False)
        description = f"key {key_fingerprint(key)[:16]} ({describe_key(key)}, {algorithm})"
    else:
        if not b.certificates:
            raise VerificationError(
                "the trust anchor is a CA, but the bundle holds no certificate", code=Code.BUNDLE_INVALID
            )
        try:
            certs = [parse_der_certificate(der) for der in b.certificates]
        except CertificateFormatError as exc:
            raise VerificationError(f"bundle certificate: {exc}", code=Code.BUNDLE_INVALID) from None
        leaf, untrusted = certs[0], certs[1:]
        algorithm = verify_signature(_signer_key(leaf), signed, env.signature)
        signer = Signer(leaf.public_bytes(Encoding.DER), is_certificate=True)
        description = algorithm
    bundles.check_statement(env, digest, repository=repository, strict_identity=m.anchor.strict_identity)
    tlog = None
    if m.rekor is not None and b.tlog_entries:
        tlog = _first_valid_entry(b.tlog_entries, m.rekor, env, signer)
    _check_tlog_required(m, tlog, "the bundle has no tlogEntries")
    if leaf is not None:
        at = float(tlog.integrated_time) if tlog else now
        description = _check_certificate(leaf, untrusted, m, at) + f" ({algorithm})"
    return _Accepted(description, tlog)


def _first_valid_entry(
    entries: Sequence[Any], rekor: RekorKey, env: bundles.DsseEnvelope, signer: Signer
) -> TlogEntry:
    errors = []
    for entry in entries:
        try:
            return verify_bundle_entry(
                entry, rekor, signature=env.signature, payload=env.payload, signer=signer
            )
        except VerificationError as exc:
            errors.append(exc)
    raise errors[0]
