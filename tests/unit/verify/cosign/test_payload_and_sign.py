"""Simple-signing payload bytes, claim checks and the signing helper."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agent.core.digest import Digest
from agent.core.imageref import ImageRef
from agent.errors import InputError, VerificationError
from agent.verify.cosign import keys
from agent.verify.cosign.artifacts import ANN_SIGNATURE, SIMPLE_SIGNING_MEDIA_TYPE
from agent.verify.cosign.payload import build_payload, check_claims, docker_reference_for
from agent.verify.cosign.sign import sign_image
from agent.verify.cosign.verify import verify_image
from tests.support.cosign import key_anchor, load_case, now_ts

DIGEST = Digest("sha256:634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00")
OTHER = Digest.of(b"other")


def test_build_payload_matches_cosign_fixture_bytes() -> None:
    _, sigs = load_case("dir-img-cosign-valid")
    assert build_payload("192.168.64.2:5000/cosign-signed-single-sample", DIGEST) == sigs[0].payload


@pytest.mark.parametrize(
    ("optional", "expected"),
    [
        (None, b'"optional":null}'),
        ({}, b'"optional":{}}'),
        ({"b": "2", "a": "1"}, b'"optional":{"a":"1","b":"2"}}'),
        ({"x": "<a&b>"}, b'"optional":{"x":"\\u003ca\\u0026b\\u003e"}}'),
        ({"x": "caf\u00e9\u2028"}, '"optional":{"x":"caf\u00e9\\u2028"}}'.encode()),
        ({"x": 'q"\\\n'}, b'"optional":{"x":"q\\"\\\\\\n"}}'),
        ({"n": {"z": True, "a": 3}}, b'"optional":{"n":{"a":3,"z":true}}}'),
    ],
)
def test_build_payload_optional_like_go(optional: Any, expected: bytes) -> None:
    out = build_payload("r.example/app", DIGEST, optional)
    assert out.endswith(expected)
    assert json.loads(out)["optional"] == optional


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("busybox", "index.docker.io/library/busybox"),
        ("docker.io/library/busybox:1.36", "index.docker.io/library/busybox"),
        ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000/team/app"),
        ("registry.example/app@" + str(DIGEST), "registry.example/app"),
    ],
)
def test_docker_reference_for(ref: str, expected: str) -> None:
    assert docker_reference_for(ImageRef.parse(ref)) == expected


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"not json", "payload-invalid"),
        (b"[]", "payload-invalid"),
        (b'{"critical":{"image":{}}}', "payload-invalid"),
        (b'{"critical":{"image":{"docker-manifest-digest":5}}}', "digest-mismatch"),
        (
            b'{"critical":{"image":{"docker-manifest-digest":"' + str(OTHER).encode() + b'"}}}',
            "digest-mismatch",
        ),
        # exact comparison: cosign does not normalise case
        (
            b'{"critical":{"image":{"docker-manifest-digest":"' + str(DIGEST).upper().encode() + b'"}}}',
            "digest-mismatch",
        ),
        (b"[" * 100000 + b"]" * 100000, "payload-invalid"),
    ],
)
def test_check_claims_rejects(payload: bytes, code: str) -> None:
    with pytest.raises(VerificationError) as err:
        check_claims(payload, DIGEST)
    assert err.value.code == code


def test_check_claims_ignores_docker_reference_unless_strict() -> None:
    payload = build_payload("elsewhere.example/copy", DIGEST)
    assert check_claims(payload, DIGEST).docker_reference == "elsewhere.example/copy"
    with pytest.raises(VerificationError, match="names repository"):
        check_claims(payload, DIGEST, repository="r.example/app", strict_identity=True)
    assert check_claims(payload, DIGEST, repository="elsewhere.example/copy:tag", strict_identity=True)
    hub = build_payload("index.docker.io/library/busybox", DIGEST)
    assert check_claims(hub, DIGEST, repository="docker.io/library/busybox", strict_identity=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
        lambda: rsa.generate_private_key(65537, 2048),
        lambda: ed25519.Ed25519PrivateKey.generate(),
    ],
)
def test_sign_image_verifies(make: Any) -> None:
    key = make()
    sig = sign_image(DIGEST, "127.0.0.1:5000/app", key)
    assert sig.media_type == SIMPLE_SIGNING_MEDIA_TYPE
    assert sig.payload == build_payload("127.0.0.1:5000/app", DIGEST)
    assert set(sig.annotations) == {ANN_SIGNATURE}
    anchor = key_anchor(keys.public_key_pem(key.public_key()).decode(), strict_identity=True)
    result = verify_image(DIGEST, [sig], anchor, now=now_ts(), image_repository="127.0.0.1:5000/app")
    assert result.origin == sig.origin
    with pytest.raises(VerificationError):
        verify_image(OTHER, [sig], anchor, now=now_ts())


def test_sign_image_with_cosign_generated_key() -> None:
    private_pem, public_pem = keys.generate_key_pair("pw")
    sig = sign_image(DIGEST, "r.example/app", keys.load_private_key(private_pem, "pw"))
    assert verify_image(DIGEST, [sig], key_anchor(public_pem.decode()), now=now_ts())


@pytest.mark.parametrize("ref", ["", "a b"])
def test_sign_image_rejects_bad_reference(ref: str) -> None:
    with pytest.raises(InputError):
        sign_image(DIGEST, ref, ec.generate_private_key(ec.SECP256R1()))
