"""The "Expected verdicts" table of tests/vectors/cosign/README.md (cosign column), on the real fixture files."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import pytest

from agent.core.digest import Digest
from agent.errors import DigestError, VerificationError
from agent.verify.cosign import keys
from agent.verify.cosign.artifacts import ANN_SIGNATURE, SignatureSet
from agent.verify.cosign.verify import MAX_SIGNATURES, evaluate, verify_image
from tests.support.cosign import CASES, key_anchor, legacy, load_case, now_ts, pub, read_dir_signature

VALID_DIGEST = Digest("sha256:634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00")


@dataclass(frozen=True)
class Row:
    case: str
    keys: tuple[str, ...]
    valid: bool
    code: str = "verified"  # expected code of the first signature's outcome when invalid
    repository: str | None = None
    strict: bool = False


ROWS = [
    Row("dir-img-cosign-valid", ("cosign.pub",), True),
    Row("dir-img-cosign-valid", ("cosign.pub", "cosign2.pub"), True),
    Row("dir-img-cosign-valid", ("cosign2.pub", "cosign.pub"), True),
    Row("dir-img-cosign-valid", ("cosign2.pub",), False, "signature-mismatch"),
    # cosign ignores docker-reference: another reference still verifies
    Row("dir-img-cosign-valid", ("cosign.pub",), True, repository="testing/manifest"),
    Row("dir-img-cosign-valid-2", ("cosign.pub",), True),
    Row("dir-img-cosign-valid-2", ("cosign.pub",), True, repository="this/does-not"),
    Row("dir-img-cosign-valid-with-tag", ("cosign.pub",), True),
    Row("dir-img-cosign-modified-manifest", ("cosign.pub",), False, "digest-mismatch"),
    Row("dir-img-cosign-manifest-digest-error", ("cosign.pub",), False, "digest-mismatch"),
    Row("dir-img-cosign-mixed", ("cosign.pub",), True),
    Row("dir-img-cosign-other-attachment", ("cosign.pub",), False, "signature-mismatch"),
    # containers/image column, reachable with strict_identity (matchRepository)
    Row(
        "dir-img-cosign-valid",
        ("cosign.pub",),
        True,
        repository="192.168.64.2:5000/cosign-signed-single-sample",
        strict=True,
    ),
    Row(
        "dir-img-cosign-valid",
        ("cosign.pub",),
        False,
        "identity-mismatch",
        repository="testing/manifest",
        strict=True,
    ),
    Row(
        "dir-img-cosign-valid-with-tag",
        ("cosign.pub",),
        True,
        repository="192.168.64.2:5000/skopeo-signed",
        strict=True,
    ),
    Row(
        "dir-img-cosign-valid-2",
        ("cosign.pub",),
        False,
        "identity-mismatch",
        repository="this/does-not",
        strict=True,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r.case}-{'+'.join(r.keys)}-{r.repository}-{r.strict}")
def test_expected_verdicts(row: Row) -> None:
    digest, sigs = load_case(row.case)
    assert digest is not None
    anchor = key_anchor(*(pub(k) for k in row.keys), strict_identity=row.strict)
    report = evaluate(digest, sigs, anchor, now=now_ts(), image_repository=row.repository)
    assert (report.verified is not None) == row.valid, report.to_dict()
    if row.valid:
        result = verify_image(digest, sigs, anchor, now=now_ts(), image_repository=row.repository)
        assert result.digest == digest and result.anchor == anchor.name and not result.tlog_verified
        assert result.signing_time is None
    else:
        assert report.outcomes[0].code == row.code, report.to_dict()
        with pytest.raises(VerificationError) as err:
            verify_image(digest, sigs, anchor, now=now_ts(), image_repository=row.repository)
        assert len(err.value.reasons) == len(sigs)
        assert all(reason.startswith(f"{row.case}/signature-") for reason in err.value.reasons)


def test_mixed_reports_each_signature() -> None:
    digest, sigs = load_case("dir-img-cosign-mixed")
    assert digest is not None
    report = evaluate(digest, sigs, key_anchor(pub("cosign.pub")), now=now_ts())
    assert [o.code for o in report.outcomes] == ["signature-mismatch", "verified"]
    assert verify_image(digest, sigs, key_anchor(pub("cosign.pub")), now=now_ts()).origin.endswith(
        "signature-2"
    )


def test_other_attachment_reason_names_media_type() -> None:
    digest, sigs = load_case("dir-img-cosign-other-attachment")
    assert digest is not None
    with pytest.raises(VerificationError) as err:
        verify_image(digest, sigs, key_anchor(pub("cosign.pub")), now=now_ts())
    assert "text/plain" in err.value.reasons[0]


def test_signature_set_input_uses_its_repository_for_strict_identity() -> None:
    digest, sigs = load_case("dir-img-cosign-valid")
    assert digest is not None
    anchor = key_anchor(pub("cosign.pub"), strict_identity=True)
    good = SignatureSet(digest, tuple(sigs), repository="192.168.64.2:5000/cosign-signed-single-sample")
    assert verify_image(digest, good, anchor, now=now_ts())
    bad = SignatureSet(digest, tuple(sigs), repository="192.168.64.2:5000/other")
    with pytest.raises(VerificationError, match="identity-mismatch"):
        verify_image(digest, bad, anchor, now=now_ts())
    with pytest.raises(VerificationError, match="repository is unknown"):
        verify_image(digest, sigs, anchor, now=now_ts())


def test_no_manifest_has_no_digest_to_verify() -> None:
    digest, sigs = load_case("dir-img-cosign-no-manifest")
    assert digest is None and len(sigs) == 1
    with pytest.raises(DigestError):
        Digest.parse("")
    # and no digest other than the signed one verifies, e.g. that of an empty manifest
    with pytest.raises(VerificationError) as err:
        verify_image(Digest.of(b""), sigs, key_anchor(pub("cosign.pub")), now=now_ts())
    assert err.value.code == "digest-mismatch"


@pytest.mark.parametrize("key", ["cosign.pub", "cosign2.pub"])
def test_unknown_key_signature(key: str) -> None:
    sig = read_dir_signature(CASES / "unknown-cosign-key.signature")
    with pytest.raises(VerificationError) as err:
        verify_image(VALID_DIGEST, [sig], key_anchor(pub(key)), now=now_ts())
    assert err.value.code == "signature-mismatch"


def _valid_sig() -> tuple[bytes, str]:
    _, sigs = load_case("dir-img-cosign-valid")
    return sigs[0].payload, sigs[0].annotations[ANN_SIGNATURE]


def _mutations() -> list[tuple[str, str | None, str]]:
    _, good = _valid_sig()
    wrapped = "\r\n".join(good[i : i + 20] for i in range(0, len(good), 20))
    return [
        ("invalid-signature-bytes", base64.b64encode(b"invalid signature").decode(), "signature-mismatch"),
        ("annotation-removed", None, "malformed-signature"),
        ("ampersand", "&", "malformed-signature"),
        ("extra-padding", good + "=", "malformed-signature"),
        ("truncated", good[:-1], "malformed-signature"),
        ("inner-space", good[:10] + " " + good[10:], "malformed-signature"),
        ("wrapped-crlf", wrapped, "verified"),  # Go's decoder skips CR/LF, so this still verifies
        ("unchanged", good, "verified"),
    ]


@pytest.mark.parametrize(("name", "annotation", "code"), _mutations(), ids=[m[0] for m in _mutations()])
def test_signature_annotation_strictness(name: str, annotation: str | None, code: str) -> None:
    payload, _ = _valid_sig()
    report = evaluate(
        VALID_DIGEST, [legacy(payload, annotation)], key_anchor(pub("cosign.pub")), now=now_ts()
    )
    assert report.outcomes[0].code == code, report.outcomes[0]


INLINE = [
    (
        b"&",
        "MEUCIARnnxZQPALBfqkB4aNAYXad79Qs6VehcrgIeZ8p7I2FAiEAzq2HXwXlz1iJeh+ucUR3L0zpjynQk6Rk0+/gXYp49RU=",
    ),
    (
        b"{}",
        "MEUCIQDkySOBGxastVP0+koTA33NH5hXjwosFau4rxTPN6g48QIgb7eWKkGqfEpHMM3aT4xiqyP/170jEkdFuciuwN4mux4=",
    ),
]


@pytest.mark.parametrize(("payload", "signature"), INLINE)
def test_inline_vectors_verify_but_are_not_image_signatures(payload: bytes, signature: str) -> None:
    key = keys.load_public_key(pub("cosign.pub"))
    assert keys.verify_signature(key, payload, base64.b64decode(signature)).startswith("ECDSA")
    report = evaluate(VALID_DIGEST, [legacy(payload, signature)], key_anchor(pub("cosign.pub")), now=now_ts())
    assert report.outcomes[0].code == "payload-invalid"


def test_tlog_required_rejects_every_fixture() -> None:
    # none of the fixtures carries a Rekor bundle: with tlog required cosign rejects them all offline
    for case in ("dir-img-cosign-valid", "dir-img-cosign-valid-2", "dir-img-cosign-mixed"):
        digest, sigs = load_case(case)
        assert digest is not None
        anchor = key_anchor(pub("cosign.pub"), require_tlog=True)
        with pytest.raises(VerificationError) as err:
            verify_image(digest, sigs, anchor, now=now_ts())
        assert any("tlog-required" in r for r in err.value.reasons), err.value.reasons


def test_empty_signature_list() -> None:
    with pytest.raises(VerificationError) as err:
        verify_image(VALID_DIGEST, [], key_anchor(pub("cosign.pub")), now=now_ts())
    assert err.value.code == "no-signatures" and err.value.reasons == ["no signatures found"]


def test_report_json_shape() -> None:
    digest, sigs = load_case("dir-img-cosign-mixed")
    assert digest is not None
    doc = evaluate(digest, sigs, key_anchor(pub("cosign.pub")), now=now_ts()).to_dict()
    assert doc["verified"] is True and doc["digest"] == str(digest)
    assert [s["verified"] for s in doc["signatures"]] == [False, True]
    assert doc["signatures"][0]["origin"] == "dir-img-cosign-mixed/signature-1"


def test_payload_is_not_reserialised() -> None:
    # a semantically equal payload with different bytes must not verify with the original signature
    payload, signature = _valid_sig()
    respaced = payload.replace(b'{"critical":', b'{ "critical":')
    report = evaluate(
        VALID_DIGEST, [legacy(respaced, signature)], key_anchor(pub("cosign.pub")), now=now_ts()
    )
    assert report.outcomes[0].code == "signature-mismatch"


def test_signature_count_is_bounded() -> None:
    payload, signature = _valid_sig()
    junk = [legacy(payload, "AAAA", origin=f"junk {i}") for i in range(MAX_SIGNATURES)]
    report = evaluate(
        VALID_DIGEST, [*junk, legacy(payload, signature)], key_anchor(pub("cosign.pub")), now=now_ts()
    )
    assert report.verified is None and report.outcomes[-1].code == "not-tried"
    assert len(report.outcomes) == MAX_SIGNATURES + 1
