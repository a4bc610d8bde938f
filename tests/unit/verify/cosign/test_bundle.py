"""Sigstore bundle (v0.3 DSSE) signatures, Rekor entries inside them and RFC 6962 inclusion proofs."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.core.anchors import Identity, TrustAnchor
from agent.core.digest import Digest
from agent.errors import VerificationError
from agent.verify.cosign import keys
from agent.verify.cosign.artifacts import BundleSignature
from agent.verify.cosign.bundle import pae, parse_bundle
from agent.verify.cosign.rekor import verify_inclusion
from agent.verify.cosign.verify import evaluate, verify_image
from tests.support.cosign import (
    EMAIL,
    T0,
    Pki,
    RekorLog,
    dsse_bundle,
    key_anchor,
    merkle_path,
    merkle_root,
    now_ts,
    pem,
    statement,
)

DIGEST = Digest.of(b"an image manifest")
KEY = ec.generate_private_key(ec.SECP256R1())
KEY_PEM = keys.public_key_pem(KEY.public_key()).decode()
REKOR = RekorLog()


def code_of(sig: BundleSignature, anchor: TrustAnchor, **kw: Any) -> str:
    return evaluate(DIGEST, [sig], anchor, now=now_ts(), **kw).outcomes[0].code


def _edit(sig: BundleSignature, edit: Any) -> BundleSignature:
    doc = json.loads(sig.bundle)
    edit(doc)
    return replace(sig, bundle=json.dumps(doc).encode())


def test_pae() -> None:
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_key_bundle_valid_without_tlog() -> None:
    result = verify_image(DIGEST, [dsse_bundle(KEY, statement(DIGEST))], key_anchor(KEY_PEM), now=now_ts())
    assert result.origin == "test bundle" and not result.tlog_verified


def test_key_bundle_with_rekor_and_inclusion_proof() -> None:
    sig = dsse_bundle(KEY, statement(DIGEST), rekor=REKOR)
    anchor = key_anchor(KEY_PEM, rekor_public_key=REKOR.pem, require_tlog=True)
    result = verify_image(DIGEST, [sig], anchor, now=now_ts())
    assert result.tlog_verified and result.signing_time == int(T0.timestamp())


@pytest.mark.parametrize(
    ("sig", "code"),
    [
        (
            dsse_bundle(KEY, statement(DIGEST, predicate_type="https://slsa.dev/provenance/v1")),
            "payload-invalid",
        ),
        (dsse_bundle(KEY, statement(Digest.of(b"another image"))), "digest-mismatch"),
        (dsse_bundle(KEY, statement(DIGEST), extra_signatures=1), "bundle-invalid"),
        (dsse_bundle(ec.generate_private_key(ec.SECP256R1()), statement(DIGEST)), "signature-mismatch"),
        (dsse_bundle(KEY, b"not json"), "payload-invalid"),
        (
            dsse_bundle(KEY, statement(DIGEST), media_type="application/vnd.dev.sigstore.bundle.v9+json"),
            "bundle-invalid",
        ),
    ],
    ids=["predicate-type", "subject-digest", "two-signatures", "other-key", "not-json", "unknown-media-type"],
)
def test_bundle_rejections(sig: BundleSignature, code: str) -> None:
    assert code_of(sig, key_anchor(KEY_PEM)) == code


@pytest.mark.parametrize(
    "media_type",
    [
        "application/vnd.dev.sigstore.bundle+json;version=0.1",
        "application/vnd.dev.sigstore.bundle+json;version=0.2",
        "application/vnd.dev.sigstore.bundle+json;version=0.3",
    ],
)
def test_older_bundle_media_types(media_type: str) -> None:
    assert (
        code_of(dsse_bundle(KEY, statement(DIGEST), media_type=media_type), key_anchor(KEY_PEM)) == "verified"
    )


def test_layer_media_type_must_be_a_bundle() -> None:
    sig = replace(dsse_bundle(KEY, statement(DIGEST)), media_type="application/json")
    assert code_of(sig, key_anchor(KEY_PEM)) == "bundle-invalid"


def test_message_signature_bundles_are_not_image_signatures() -> None:
    def to_message(doc: dict[str, Any]) -> None:
        doc.pop("dsseEnvelope")
        doc["messageSignature"] = {
            "messageDigest": {
                "algorithm": "SHA2_256",
                "digest": base64.b64encode(bytes.fromhex(DIGEST.hex)).decode(),
            },
            "signature": base64.b64encode(keys.sign(bytes.fromhex(DIGEST.hex), KEY)).decode(),
        }

    sig = _edit(dsse_bundle(KEY, statement(DIGEST)), to_message)
    outcome = evaluate(DIGEST, [sig], key_anchor(KEY_PEM), now=now_ts()).outcomes[0]
    assert outcome.code == "bundle-invalid" and "messageSignature" in outcome.message


@pytest.mark.parametrize(
    ("kw", "edit"),
    [
        ({"tamper_proof": True}, None),
        ({"bind_signature": b"some other signature"}, None),
        ({}, lambda d: d["verificationMaterial"]["tlogEntries"][0].pop("inclusionPromise")),
        ({}, lambda d: d["verificationMaterial"]["tlogEntries"][0].update(integratedTime="1")),
        ({}, lambda d: d["verificationMaterial"]["tlogEntries"][0]["inclusionProof"].update(treeSize="12")),
        (
            {},
            lambda d: d["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]["checkpoint"].update(
                envelope="rekor.test - 1\n11\nAAAA\n\n"
            ),
        ),
        ({}, lambda d: d["verificationMaterial"]["tlogEntries"][0]["logId"].update(keyId="AAAA")),
    ],
    ids=[
        "tampered-proof",
        "other-signature",
        "no-promise",
        "forged-time",
        "tree-size",
        "checkpoint",
        "other-log",
    ],
)
def test_bundle_tlog_rejections(kw: dict[str, Any], edit: Any) -> None:
    sig = dsse_bundle(KEY, statement(DIGEST), rekor=REKOR, **kw)
    if edit is not None:
        sig = _edit(sig, edit)
    assert code_of(sig, key_anchor(KEY_PEM, rekor_public_key=REKOR.pem)) == "tlog-invalid"


def test_bundle_without_proof_relies_on_promise() -> None:
    sig = dsse_bundle(KEY, statement(DIGEST), rekor=REKOR, proof=False)
    assert code_of(sig, key_anchor(KEY_PEM, rekor_public_key=REKOR.pem)) == "verified"


def test_bundle_tlog_required_but_missing() -> None:
    sig = dsse_bundle(KEY, statement(DIGEST))
    assert code_of(sig, key_anchor(KEY_PEM, rekor_public_key=REKOR.pem, require_tlog=True)) == "tlog-required"


def test_bundle_ca_mode() -> None:
    pki = Pki()
    sig = dsse_bundle(pki.leaf_key, statement(DIGEST), certificates=[pki.leaf()], rekor=REKOR)
    anchor = TrustAnchor(
        name="ca",
        kind="ca",
        pem=pki.anchor().pem,
        intermediates=pem(pki.inter),
        identities=(Identity(subject=EMAIL),),
        rekor_public_key=REKOR.pem,
    )
    result = verify_image(DIGEST, [sig], anchor, now=now_ts())
    assert result.tlog_verified and EMAIL in result.description
    wrong = replace(anchor, identities=(Identity(subject="someone@else.example"),))
    assert code_of(sig, wrong) == "identity-mismatch"
    assert code_of(sig, replace(anchor, intermediates=None)) == "certificate-untrusted"
    # a key-mode bundle offers no certificate to a CA anchor
    assert code_of(dsse_bundle(pki.leaf_key, statement(DIGEST)), anchor) == "bundle-invalid"


def test_bundle_strict_identity() -> None:
    anchor = key_anchor(KEY_PEM, strict_identity=True)
    named = dsse_bundle(KEY, statement(DIGEST, name="r.example/app"))
    assert code_of(named, anchor, image_repository="r.example/app") == "verified"
    assert code_of(named, anchor, image_repository="r.example/other") == "identity-mismatch"
    # cosign's statements carry no subject name: strict identity cannot be satisfied by them
    assert (
        code_of(dsse_bundle(KEY, statement(DIGEST)), anchor, image_repository="r.example/app")
        == "identity-mismatch"
    )


def test_parse_bundle_materials() -> None:
    pki = Pki()
    b = parse_bundle(dsse_bundle(pki.leaf_key, statement(DIGEST), certificates=[pki.leaf()]).bundle)
    assert b.version == "0.3" and len(b.certificates) == 1 and b.content == "dsse-envelope"
    k = parse_bundle(dsse_bundle(KEY, statement(DIGEST)).bundle)
    assert k.certificates == () and k.public_key_hint


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17])
def test_inclusion_proofs_every_index(size: int) -> None:
    leaves = [b"leaf %d" % i for i in range(size)]
    root = merkle_root(leaves)
    for i in range(size):
        leaf_hash = hashlib.sha256(b"\x00" + leaves[i]).digest()
        proof = merkle_path(i, leaves)
        verify_inclusion(leaf_hash, i, size, proof, root)
        with pytest.raises(VerificationError):
            verify_inclusion(leaf_hash, i, size, [*proof, root], root)
        if proof:
            with pytest.raises(VerificationError):
                verify_inclusion(leaf_hash, i, size, proof[:-1], root)
        if size > 1:
            with pytest.raises(VerificationError):
                verify_inclusion(leaf_hash, (i + 1) % size, size, proof, root)
    with pytest.raises(VerificationError):
        verify_inclusion(b"\x00" * 32, size, size, [], root)
