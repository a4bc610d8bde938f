"""Rekor transparency-log evidence, verified offline: signed entry timestamps (SETs), entry binding,
RFC 6962 inclusion proofs.

A SET is Rekor's signed promise that an entry was integrated at ``integratedTime``; we check it with the
trust anchor's Rekor key and then make sure the entry is about *this* signature (same signature bytes,
same key or certificate, same payload hash). The integrated time becomes the signing time.

Checkpoints (signed tree heads) in v0.3 bundles are only checked for consistency with the inclusion
proof (tree size and root hash); their note signature is not verified, so the SET remains the anchor of
trust for the log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.errors import Code, KeyMaterialError, VerificationError
from agent.verify.cosign.certs import CertificateFormatError, parse_der_certificate
from agent.verify.cosign.encoding import DecodeError, b64decode_strict, b64encode, parse_json, pem_blocks
from agent.verify.cosign.keys import load_public_key, spki_der

MAX_PROOF_HASHES = 64


@dataclass(frozen=True)
class RekorKey:
    key: ec.EllipticCurvePublicKey
    #: hex sha256 of the key's PKIX DER: the log ID Rekor puts in every entry
    log_id: str


def load_rekor_key(pem: str | bytes, what: str = "rekor_public_key") -> RekorKey:
    key = load_public_key(pem, what)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyMaterialError(f"{what}: Rekor keys must be ECDSA, found {type(key).__name__}")
    return RekorKey(key, hashlib.sha256(spki_der(key)).hexdigest())


@dataclass(frozen=True)
class Signer:
    """What signed: a certificate (DER) in CA mode, or a public key (PKIX DER) in key mode."""

    der: bytes
    is_certificate: bool


@dataclass(frozen=True)
class TlogEntry:
    integrated_time: int
    log_index: int
    log_id: str
    kind: str


def _fail(message: str) -> VerificationError:
    return VerificationError(message, code=Code.TLOG_INVALID)


def _get(doc: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            raise _fail(f"Rekor entry lacks {'.'.join(path)}")
        doc = doc[key]
    return doc


def _int(value: Any, what: str) -> int:
    # protobuf JSON writes int64 as decimal strings; the legacy annotation writes numbers
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    if type(value) is not int or value < 0 or value >= 2**63:
        raise _fail(f"{what} must be a non-negative integer, found {str(value)[:40]!r}")
    return value


def _b64(value: Any, what: str) -> bytes:
    try:
        return b64decode_strict(value)
    except DecodeError as exc:
        raise _fail(f"{what}: {exc}") from None


def verify_set(
    rekor: RekorKey, body_b64: str, integrated_time: int, log_index: int, log_id: str, set_signature: bytes
) -> None:
    """Check a signed entry timestamp: ECDSA/SHA-256 over the RFC 8785 form of the four fields."""
    if log_id.lower() != rekor.log_id:
        raise _fail(f"entry is from log {log_id[:64]!r}, expected the configured Rekor log {rekor.log_id}")
    try:
        signed = rfc8785.dumps(
            {"body": body_b64, "integratedTime": integrated_time, "logID": log_id, "logIndex": log_index}
        )
    except (rfc8785.CanonicalizationError, ValueError) as exc:  # e.g. integers beyond 2**53
        raise _fail(f"entry cannot be canonicalized: {exc}") from None
    try:
        rekor.key.verify(set_signature, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise _fail("signed entry timestamp does not verify with the configured Rekor key") from None


def _signer_matches(pem_b64: Any, signer: Signer, what: str) -> None:
    try:
        blocks = pem_blocks(_b64(pem_b64, what))
    except DecodeError as exc:
        raise _fail(f"{what} is not PEM: {exc}") from None
    if len(blocks) != 1 or blocks[0].type not in ("CERTIFICATE", "PUBLIC KEY"):
        raise _fail(f"{what} must hold one CERTIFICATE or PUBLIC KEY")
    block = blocks[0]
    if signer.is_certificate:
        ok = block.type == "CERTIFICATE" and block.body == signer.der
    elif block.type == "PUBLIC KEY":
        ok = block.body == signer.der
    else:
        try:
            cert = parse_der_certificate(block.body)
            ok = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) == signer.der
        except (CertificateFormatError, ValueError):
            ok = False
    if not ok:
        raise _fail(
            f"{what} names a different {'certificate' if signer.is_certificate else 'key'} than the signer"
        )


def _check_hash(spec: Any, path: tuple[str, ...], payload: bytes) -> None:
    algorithm, value = _get(spec, *path, "algorithm"), _get(spec, *path, "value")
    expected = hashlib.sha256(payload).hexdigest()
    if algorithm != "sha256" or not isinstance(value, str) or value.lower() != expected:
        raise _fail(f"entry records {algorithm}:{str(value)[:64]}, expected payload hash sha256:{expected}")


def check_binding(
    body: bytes,
    *,
    signature: bytes,
    payload: bytes,
    signer: Signer,
    kinds: Sequence[str] = ("hashedrekord", "rekord"),
) -> str:
    """Is this Rekor entry body about this signature? Returns the entry kind; raises VerificationError.

    hashedrekord/rekord: signature over the payload. dsse: ``payload`` is the DSSE payload and
    ``signature`` the envelope's signature.
    """
    try:
        doc = parse_json(body)
    except DecodeError as exc:
        raise _fail(f"Rekor entry body: {exc}") from None
    kind, spec = _get(doc, "kind"), _get(doc, "spec")
    if kind not in kinds:
        raise _fail(f"Rekor entry kind is {str(kind)[:40]!r}, expected {' or '.join(kinds)}")
    if kind in ("hashedrekord", "rekord"):
        if _b64(_get(spec, "signature", "content"), "entry signature") != signature:
            raise _fail("Rekor entry holds a different signature than this one")
        _signer_matches(_get(spec, "signature", "publicKey", "content"), signer, "entry public key")
        _check_hash(spec, ("data", "hash"), payload)
        return str(kind)
    if kind == "dsse":
        _check_hash(spec, ("payloadHash",), payload)
        sigs = _get(spec, "signatures")
        if not isinstance(sigs, list) or len(sigs) != 1:
            raise _fail("dsse entry must record exactly one signature")
        if _b64(_get(sigs[0], "signature"), "entry signature") != signature:
            raise _fail("Rekor entry holds a different signature than this one")
        _signer_matches(_get(sigs[0], "verifier"), signer, "entry verifier")
        return "dsse"
    raise _fail(f"unsupported Rekor entry kind {str(kind)[:40]!r}")


def verify_legacy_bundle(
    annotation: str, rekor: RekorKey, *, signature: bytes, payload: bytes, signer: Signer
) -> TlogEntry:
    """Verify a ``dev.sigstore.cosign/bundle`` annotation for one ``.sig`` layer."""
    try:
        doc = parse_json(annotation)
    except DecodeError as exc:
        raise _fail(f"bundle annotation: {exc}") from None
    body_b64 = _get(doc, "Payload", "body")
    if not isinstance(body_b64, str):
        raise _fail("bundle Payload.body must be a string")
    t = _int(_get(doc, "Payload", "integratedTime"), "integratedTime")
    index = _int(_get(doc, "Payload", "logIndex"), "logIndex")
    log_id = _get(doc, "Payload", "logID")
    if not isinstance(log_id, str):
        raise _fail("bundle Payload.logID must be a hex string")
    verify_set(
        rekor, body_b64, t, index, log_id, _b64(_get(doc, "SignedEntryTimestamp"), "SignedEntryTimestamp")
    )
    kind = check_binding(_b64(body_b64, "entry body"), signature=signature, payload=payload, signer=signer)
    return TlogEntry(t, index, rekor.log_id, kind)


def verify_bundle_entry(
    entry: Any, rekor: RekorKey, *, signature: bytes, payload: bytes, signer: Signer
) -> TlogEntry:
    """Verify one v0.3 bundle ``tlogEntries`` item: promise (required), binding, inclusion proof (if any)."""
    log_id = _b64(_get(entry, "logId", "keyId"), "logId.keyId").hex()
    t = _int(_get(entry, "integratedTime"), "integratedTime")
    index = _int(_get(entry, "logIndex"), "logIndex")
    body = _b64(_get(entry, "canonicalizedBody"), "canonicalizedBody")
    promise = entry.get("inclusionPromise")
    if promise is None:
        raise _fail("tlog entry has no inclusion promise (SET); an inclusion proof alone is not trusted here")
    set_sig = _b64(_get(promise, "signedEntryTimestamp"), "signedEntryTimestamp")
    verify_set(rekor, b64encode(body), t, index, log_id, set_sig)
    kind = check_binding(body, signature=signature, payload=payload, signer=signer, kinds=("dsse",))
    proof = entry.get("inclusionProof")
    if proof is not None:
        _verify_bundle_proof(proof, body, index)
    return TlogEntry(t, index, rekor.log_id, kind)


def _verify_bundle_proof(proof: Any, body: bytes, entry_index: int) -> None:
    index = _int(_get(proof, "logIndex"), "inclusionProof.logIndex")
    size = _int(_get(proof, "treeSize"), "inclusionProof.treeSize")
    root = _b64(_get(proof, "rootHash"), "inclusionProof.rootHash")
    raw_hashes = _get(proof, "hashes")
    if not isinstance(raw_hashes, list) or len(raw_hashes) > MAX_PROOF_HASHES:
        raise _fail("inclusionProof.hashes must be a list of at most 64 hashes")
    hashes_ = [_b64(h, "inclusionProof.hashes") for h in raw_hashes]
    # Rekor v1 bundles carry the global log index in the entry and the shard-local one in the proof;
    # only the proof's index addresses the leaf in this tree.
    del entry_index
    verify_inclusion(hashlib.sha256(b"\x00" + body).digest(), index, size, hashes_, root)
    checkpoint = proof.get("checkpoint")
    if checkpoint is not None:
        _check_checkpoint(_get(checkpoint, "envelope"), size, root)


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """RFC 6962 / RFC 9162 2.1.3.2 inclusion proof check; raises VerificationError."""
    if index >= size:
        raise _fail(f"inclusion proof index {index} is outside a tree of size {size}")
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if len(p) != 32:
            raise _fail("inclusion proof hashes must be 32 bytes")
        if sn == 0:
            raise _fail("inclusion proof has too many hashes")
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise _fail("inclusion proof has too few hashes")
    if r != root:
        raise _fail("inclusion proof does not lead to the stated root hash")


def _check_checkpoint(envelope: Any, size: int, root: bytes) -> None:
    if not isinstance(envelope, str):
        raise _fail("checkpoint envelope must be a string")
    lines = envelope.split("\n")
    if len(lines) < 3:
        raise _fail("checkpoint is not a signed note (origin, size, root hash)")
    try:
        cp_size, cp_root = int(lines[1]), b64decode_strict(lines[2])
    except (ValueError, DecodeError):
        raise _fail("checkpoint tree size or root hash is malformed") from None
    if cp_size != size or cp_root != root:
        raise _fail("checkpoint does not match the inclusion proof's tree size and root hash")
