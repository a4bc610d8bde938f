"""CA mode (certificate annotations chained to configured roots) and Rekor SETs on legacy layers."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.core.anchors import Identity, TrustAnchor
from agent.core.digest import Digest
from agent.errors import KeyMaterialError, VerificationError
from agent.verify.cosign import keys
from agent.verify.cosign.artifacts import ANN_BUNDLE, ANN_CERTIFICATE, ANN_CHAIN, LegacySignature
from agent.verify.cosign.payload import build_payload
from agent.verify.cosign.verify import evaluate, prepare_anchor, verify_image
from tests.support.cosign import (
    EMAIL,
    ISSUER_URL,
    T0,
    WORKFLOW,
    Pki,
    RekorLog,
    issuer_extensions,
    key_anchor,
    legacy,
    make_cert,
    now_ts,
    pem,
)

DIGEST = Digest.of(b"image manifest")
PAYLOAD = build_payload("r.example/app", DIGEST)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def ca_sig(
    signing_key: Any,
    leaf: x509.Certificate | None,
    chain: list[x509.Certificate] | None = None,
    payload: bytes = PAYLOAD,
    **ann: str,
) -> LegacySignature:
    extra = dict(ann)
    if leaf is not None:
        extra[ANN_CERTIFICATE] = pem(leaf)
    if chain:
        extra[ANN_CHAIN] = pem(*chain)
    return legacy(payload, keys.sign(payload, signing_key), **extra)


def code_of(sig: LegacySignature, anchor: TrustAnchor, when: dt.datetime = T0) -> str:
    return evaluate(DIGEST, [sig], anchor, now=when.timestamp()).outcomes[0].code


def test_ca_valid_with_carried_chain(pki: Pki) -> None:
    sig = ca_sig(pki.leaf_key, pki.leaf(), [pki.inter, pki.root])
    result = verify_image(DIGEST, [sig], pki.anchor(), now=now_ts())
    assert EMAIL in result.description and ISSUER_URL in result.description
    assert not result.tlog_verified and result.signing_time is None


def test_ca_valid_with_configured_intermediates(pki: Pki) -> None:
    sig = ca_sig(pki.leaf_key, pki.leaf())
    anchor = TrustAnchor(
        name="ca", kind="ca", pem=pem(pki.root), intermediates=pem(pki.inter), any_identity=True
    )
    assert code_of(sig, anchor) == "verified"
    # a CA anchor that names nobody and does not say any_identity trusts nobody
    nobody = TrustAnchor(name="ca", kind="ca", pem=pem(pki.root), intermediates=pem(pki.inter))
    assert code_of(sig, nobody) == "identity-mismatch"
    # without any intermediate the leaf cannot be chained
    assert code_of(sig, pki.anchor()) == "certificate-untrusted"


def test_ca_untrusted_root(pki: Pki) -> None:
    other = Pki()
    sig = ca_sig(other.leaf_key, other.leaf(), [other.inter, other.root])
    assert code_of(sig, pki.anchor()) == "certificate-untrusted"


def test_carried_self_signed_root_is_not_trusted(pki: Pki) -> None:
    evil_key = ec.generate_private_key(ec.SECP256R1())
    # same subject name as the real root, self-signed, carried in the chain annotation
    evil_root = make_cert("Test Root", evil_key, "Test Root", evil_key, ca=True)
    leaf = make_cert(
        "",
        pki.leaf_key,
        "Test Root",
        evil_key,
        ca=False,
        eku=[ExtendedKeyUsageOID.CODE_SIGNING],
        sans=[x509.RFC822Name(EMAIL)],
    )
    for chain in ([evil_root], [evil_root, evil_root]):
        assert code_of(ca_sig(pki.leaf_key, leaf, chain), pki.anchor()) == "certificate-untrusted"
    # trusting it explicitly would work: the failure above is about trust, not format
    assert (
        code_of(
            ca_sig(pki.leaf_key, leaf, [evil_root]),
            TrustAnchor(name="e", kind="ca", pem=pem(evil_root), any_identity=True),
        )
        == "verified"
    )


@pytest.mark.parametrize(
    ("kw", "when", "code"),
    [
        ({"not_after": T0 - dt.timedelta(minutes=1)}, T0, "certificate-expired"),
        ({"not_before": T0 + dt.timedelta(minutes=1)}, T0, "certificate-expired"),
        ({}, T0 + dt.timedelta(days=31), "certificate-expired"),
        ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, T0, "certificate-eku"),
        ({"eku": None}, T0, "verified"),  # a leaf without EKU is unrestricted (Decision 10)
        ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CODE_SIGNING]}, T0, "verified"),
    ],
)
def test_ca_leaf_validity_and_eku(pki: Pki, kw: dict[str, Any], when: dt.datetime, code: str) -> None:
    sig = ca_sig(pki.leaf_key, pki.leaf(**kw), [pki.inter, pki.root])
    assert code_of(sig, pki.anchor(), when) == code


def test_ca_expired_intermediate_at_signing_time(pki: Pki) -> None:
    inter = make_cert(
        "Test Intermediate",
        pki.inter_key,
        "Test Root",
        pki.root_key,
        ca=True,
        not_after=T0 - dt.timedelta(hours=1),
    )
    sig = ca_sig(pki.leaf_key, pki.leaf(), [inter, pki.root])
    assert code_of(sig, pki.anchor()) == "certificate-expired"


def test_ca_path_length_enforced(pki: Pki) -> None:
    sub_key = ec.generate_private_key(ec.SECP256R1())
    sub = make_cert("Sub CA", sub_key, "Test Intermediate", pki.inter_key, ca=True)  # inter has pathLen 0
    leaf = make_cert("", pki.leaf_key, "Sub CA", sub_key, ca=False, eku=[ExtendedKeyUsageOID.CODE_SIGNING])
    assert (
        code_of(ca_sig(pki.leaf_key, leaf, [sub, pki.inter, pki.root]), pki.anchor())
        == "certificate-path-length"  # with its own reason (test_chain_rules.py)
    )


def test_non_ca_intermediate_rejected(pki: Pki) -> None:
    fake_inter = make_cert("Test Intermediate", pki.inter_key, "Test Root", pki.root_key, ca=False)
    sig = ca_sig(pki.leaf_key, pki.leaf(), [fake_inter, pki.root])
    assert code_of(sig, pki.anchor()) == "certificate-ca-invalid"


@pytest.mark.parametrize(
    ("identities", "code"),
    [
        ((Identity(subject=EMAIL),), "verified"),
        ((Identity(subject="other@example.com"),), "identity-mismatch"),
        ((Identity(subject="other@example.com"), Identity(subject=WORKFLOW)), "verified"),
        ((Identity(subject_regexp=r"https://github\.com/example/.*"),), "verified"),
        ((Identity(subject_regexp=r"example\.com"),), "identity-mismatch"),  # full match required
        ((Identity(subject=EMAIL, issuer=ISSUER_URL),), "verified"),
        ((Identity(subject=EMAIL, issuer="https://other.example"),), "identity-mismatch"),
        ((Identity(issuer_regexp=r"https://issuer\..*"),), "verified"),
        ((Identity(issuer_regexp=r"issuer"),), "identity-mismatch"),
    ],
)
def test_ca_identities(pki: Pki, identities: tuple[Identity, ...], code: str) -> None:
    sig = ca_sig(pki.leaf_key, pki.leaf(), [pki.inter, pki.root])
    assert code_of(sig, pki.anchor(identities)) == code


@pytest.mark.parametrize(
    ("v2", "v1", "code"),
    [
        (ISSUER_URL, None, "verified"),
        (None, ISSUER_URL, "verified"),
        (ISSUER_URL, "https://other.example", "identity-mismatch"),
        (None, None, "identity-mismatch"),
    ],
)
def test_ca_issuer_extensions(pki: Pki, v2: str | None, v1: str | None, code: str) -> None:
    leaf = pki.leaf(extra=issuer_extensions(v2, v1))
    sig = ca_sig(pki.leaf_key, leaf, [pki.inter, pki.root])
    assert code_of(sig, pki.anchor((Identity(issuer=ISSUER_URL),))) == code


def test_ca_othername_and_ip_sans(pki: Pki) -> None:
    import ipaddress

    username = x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.7"), b"\x0c\x05alice")
    leaf = pki.leaf(
        sans=[username, x509.IPAddress(ipaddress.ip_address("10.0.0.1")), x509.DNSName("build.example")]
    )
    sig = ca_sig(pki.leaf_key, leaf, [pki.inter, pki.root])
    for subject in ("alice", "10.0.0.1", "build.example"):
        assert code_of(sig, pki.anchor((Identity(subject=subject),))) == "verified"
    assert code_of(sig, pki.anchor((Identity(subject=EMAIL),))) == "identity-mismatch"


def test_ca_signature_material_errors(pki: Pki) -> None:
    other_key = ec.generate_private_key(ec.SECP256R1())
    assert code_of(ca_sig(other_key, pki.leaf(), [pki.inter]), pki.anchor()) == "signature-mismatch"
    assert code_of(ca_sig(pki.leaf_key, None), pki.anchor()) == "malformed-signature"
    two = ca_sig(pki.leaf_key, None, **{ANN_CERTIFICATE: pem(pki.leaf(), pki.leaf())})
    assert code_of(two, pki.anchor()) == "malformed-signature"
    junk = ca_sig(
        pki.leaf_key,
        None,
        **{ANN_CERTIFICATE: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"},
    )
    assert code_of(junk, pki.anchor()) == "malformed-signature"


def test_ca_payload_claims_still_apply(pki: Pki) -> None:
    payload = build_payload("r.example/app", Digest.of(b"another image"))
    sig = ca_sig(pki.leaf_key, pki.leaf(), [pki.inter], payload=payload)
    assert code_of(sig, pki.anchor()) == "digest-mismatch"


@pytest.mark.parametrize(
    ("anchor", "message"),
    [
        (TrustAnchor(name="a", kind="ca", pem="no pem here"), "holds no CERTIFICATE"),
        (
            TrustAnchor(
                name="a", kind="ca", pem="-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
            ),
            "X.509",
        ),
        (TrustAnchor(name="a", kind="key", pem="garbage"), "no PEM block"),
        (TrustAnchor(name="a", kind="key", pem="", rekor_public_key="garbage"), "rekor_public_key"),
    ],
)
def test_bad_anchor_material(anchor: TrustAnchor, message: str) -> None:
    with pytest.raises(KeyMaterialError, match=message):
        prepare_anchor(anchor)
    with pytest.raises(KeyMaterialError):
        verify_image(DIGEST, [legacy(PAYLOAD, "AAAA")], anchor, now=now_ts())


def test_rekor_key_must_be_ecdsa() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ed = keys.public_key_pem(ed25519.Ed25519PrivateKey.generate().public_key()).decode()
    with pytest.raises(KeyMaterialError, match="ECDSA"):
        prepare_anchor(TrustAnchor(name="a", kind="key", pem=ed, rekor_public_key=ed))


# --- Rekor on legacy layers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rekor() -> RekorLog:
    return RekorLog()


SIGNER = ec.generate_private_key(ec.SECP256R1())
SIGNER_PEM = keys.public_key_pem(SIGNER.public_key())
T_INT = int(T0.timestamp()) - 3600


def rekor_sig(rekor: RekorLog, **kw: Any) -> LegacySignature:
    payload = kw.pop("payload", PAYLOAD)
    signature = keys.sign(payload, SIGNER)
    bound = {"signature": signature, "payload": payload, "signer_pem": SIGNER_PEM, "integrated_time": T_INT}
    bound.update(kw)
    return legacy(payload, signature, **{ANN_BUNDLE: rekor.legacy_bundle(**bound)})


def key_rekor_anchor(rekor: RekorLog, **kw: Any) -> TrustAnchor:
    return key_anchor(SIGNER_PEM.decode(), rekor_public_key=rekor.pem, **kw)


@pytest.mark.parametrize("kind", ["hashedrekord", "rekord"])
def test_rekor_valid(rekor: RekorLog, kind: str) -> None:
    result = verify_image(
        DIGEST, [rekor_sig(rekor, kind=kind)], key_rekor_anchor(rekor, require_tlog=True), now=now_ts()
    )
    assert result.tlog_verified and result.signing_time == T_INT


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        ({"forge": True}, "tlog-invalid"),
        ({"signature": b"another signature"}, "tlog-invalid"),
        ({"payload_hash_of": b"another payload"}, "tlog-invalid"),
        (
            {"signer_pem": keys.public_key_pem(ec.generate_private_key(ec.SECP256R1()).public_key())},
            "tlog-invalid",
        ),
        ({"kind": "intoto"}, "tlog-invalid"),
    ],
)
def test_rekor_rejections(rekor: RekorLog, kw: dict[str, Any], code: str) -> None:
    if "payload_hash_of" in kw:
        other = kw.pop("payload_hash_of")
        signature = keys.sign(PAYLOAD, SIGNER)
        ann = rekor.legacy_bundle(
            signature=signature, payload=other, signer_pem=SIGNER_PEM, integrated_time=T_INT
        )
        sig = legacy(PAYLOAD, signature, **{ANN_BUNDLE: ann})
    else:
        sig = rekor_sig(rekor, **kw)
    assert code_of(sig, key_rekor_anchor(rekor)) == code


def test_rekor_entry_from_another_log(rekor: RekorLog) -> None:
    other = RekorLog()
    sig = rekor_sig(other)
    outcome = evaluate(DIGEST, [sig], key_rekor_anchor(rekor), now=now_ts()).outcomes[0]
    assert outcome.code == "tlog-invalid" and rekor.log_id in outcome.message


def test_rekor_malformed_annotation(rekor: RekorLog) -> None:
    signature = keys.sign(PAYLOAD, SIGNER)
    for ann in ("not json", "{}", '{"Payload":{"body":1}}', '{"Payload":{"body":"x","integratedTime":-1}}'):
        assert (
            code_of(legacy(PAYLOAD, signature, **{ANN_BUNDLE: ann}), key_rekor_anchor(rekor))
            == "tlog-invalid"
        )


def test_tlog_required_but_missing(rekor: RekorLog) -> None:
    plain = legacy(PAYLOAD, keys.sign(PAYLOAD, SIGNER))
    with pytest.raises(VerificationError) as err:
        verify_image(DIGEST, [plain], key_rekor_anchor(rekor, require_tlog=True), now=now_ts())
    assert err.value.code == "tlog-required" and "tlog-required" in err.value.reasons[0]
    # required, but the anchor has no Rekor key: nothing can satisfy it
    assert code_of(rekor_sig(rekor), key_anchor(SIGNER_PEM.decode(), require_tlog=True)) == "tlog-required"
    # not required: the bundle is ignored without a Rekor key, and a plain signature passes
    assert code_of(plain, key_anchor(SIGNER_PEM.decode())) == "verified"
    assert code_of(rekor_sig(rekor, forge=True), key_anchor(SIGNER_PEM.decode())) == "verified"


def test_ca_with_rekor_uses_integrated_time(pki: Pki, rekor: RekorLog) -> None:
    # a short-lived certificate, expired now but valid when Rekor integrated the entry
    leaf = pki.leaf(not_before=T0 - dt.timedelta(minutes=5), not_after=T0 + dt.timedelta(minutes=5))
    leaf_pem = leaf.public_bytes(serialization.Encoding.PEM)
    signature = keys.sign(PAYLOAD, pki.leaf_key)
    anchor = pki.anchor(rekor_public_key=rekor.pem)
    later = T0 + dt.timedelta(days=2)

    def sig_at(t: dt.datetime, signer_pem: bytes = leaf_pem) -> LegacySignature:
        ann = rekor.legacy_bundle(
            signature=signature, payload=PAYLOAD, signer_pem=signer_pem, integrated_time=int(t.timestamp())
        )
        return legacy(
            PAYLOAD,
            signature,
            **{ANN_CERTIFICATE: pem(leaf), ANN_CHAIN: pem(pki.inter, pki.root), ANN_BUNDLE: ann},
        )

    result = verify_image(DIGEST, [sig_at(T0)], anchor, now=later.timestamp())
    assert result.tlog_verified and result.signing_time == T0.timestamp()
    assert code_of(sig_at(T0 + dt.timedelta(minutes=10)), anchor, later) == "certificate-expired"
    # the entry must name the certificate, not just its key
    assert code_of(sig_at(T0, SIGNER_PEM), anchor, later) == "tlog-invalid"
    # without Rekor, the validity is checked at "now": expired
    no_tlog = legacy(PAYLOAD, signature, **{ANN_CERTIFICATE: pem(leaf), ANN_CHAIN: pem(pki.inter, pki.root)})
    assert code_of(no_tlog, pki.anchor(), later) == "certificate-expired"
