"""Key loading, signing and verification across algorithms; cosign.key files."""

from __future__ import annotations

import base64
import hashlib
import json
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa
from cryptography.utils import CryptographyDeprecationWarning

from agent.errors import KeyMaterialError, VerificationError
from agent.verify.cosign import keys
from agent.verify.cosign.encoding import pem_blocks
from tests.support.cosign import KEYS, pub

ENCRYPTED = [
    (
        "cosign_generated_encrypted_empty_private.key",
        "",
        "0d8cd6794def5c5e3b42f37bf6ee29bb252ce269771cf3c0785d92fca7be586f",
    ),
    (
        "ecdsa_encrypted_private.key",
        "123",
        "00208863d9785226df9ad68ceb2ad5b43f1f5ddd686147f25116ee088726eb6d",
    ),
]


@pytest.mark.parametrize(("name", "password", "spki_sha256"), ENCRYPTED)
def test_encrypted_key_vectors(name: str, password: str, spki_sha256: str) -> None:
    key = keys.load_private_key((KEYS / "encrypted" / name).read_bytes(), password)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert hashlib.sha256(keys.spki_der(key.public_key())).hexdigest() == spki_sha256


@pytest.mark.parametrize(("name", "password", "spki_sha256"), ENCRYPTED)
def test_encrypted_key_wrong_password(name: str, password: str, spki_sha256: str) -> None:
    with pytest.raises(KeyMaterialError, match="wrong password"):
        keys.load_private_key((KEYS / "encrypted" / name).read_bytes(), password + "x")


def _key_json(pem_text: bytes) -> dict[str, Any]:
    return json.loads(pem_blocks(pem_text)[0].body)


def test_generate_key_pair_is_cosign_format() -> None:
    private_pem, public_pem = keys.generate_key_pair("s3cret")
    blocks = pem_blocks(private_pem)
    assert [b.type for b in blocks] == ["ENCRYPTED SIGSTORE PRIVATE KEY"]
    doc = json.loads(blocks[0].body)
    assert list(doc) == ["kdf", "cipher", "ciphertext"]
    assert list(doc["kdf"]) == ["name", "params", "salt"]
    assert doc["kdf"]["params"] == {"N": 65536, "r": 8, "p": 1} and list(doc["kdf"]["params"]) == [
        "N",
        "r",
        "p",
    ]
    assert doc["cipher"]["name"] == "nacl/secretbox" and len(base64.b64decode(doc["cipher"]["nonce"])) == 24
    assert len(base64.b64decode(doc["kdf"]["salt"])) == 32
    assert b" " not in blocks[0].body  # Go's json.Marshal writes no whitespace
    assert all(len(line) <= 64 for line in private_pem.splitlines())
    key = keys.load_private_key(private_pem, "s3cret")
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert keys.load_public_key(public_pem) is not None
    assert public_pem == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(KeyMaterialError):
        keys.load_private_key(private_pem, "wrong")


def test_encrypted_key_roundtrip_older_cost_and_empty_password() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    pem_text = keys.encrypt_private_key(key, "", n=32768)
    assert _key_json(pem_text)["kdf"]["params"]["N"] == 32768
    back = keys.load_private_key(pem_text, None)
    assert keys.spki_der(back.public_key()) == keys.spki_der(key.public_key())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["kdf"]["params"].update(N=16384), "scrypt parameters"),
        (lambda d: d["kdf"]["params"].update(N=65536.0), "scrypt parameters"),
        (lambda d: d["kdf"]["params"].update(r=1), "scrypt parameters"),
        (lambda d: d["kdf"].update(name="pbkdf2"), "kdf/cipher"),
        (lambda d: d["cipher"].update(nonce="AAAA"), "nonce"),
        (lambda d: d.pop("ciphertext"), "JSON format"),
        (lambda d: d.update(ciphertext="!!"), "JSON format"),
    ],
)
def test_encrypted_key_bad_parameters(mutate: Callable[[dict[str, Any]], None], message: str) -> None:
    doc = _key_json((KEYS / "encrypted" / "ecdsa_encrypted_private.key").read_bytes())
    mutate(doc)
    body = base64.b64encode(json.dumps(doc).encode()).decode()
    text = (
        f"-----BEGIN ENCRYPTED COSIGN PRIVATE KEY-----\n{body}\n-----END ENCRYPTED COSIGN PRIVATE KEY-----\n"
    )
    with pytest.raises(KeyMaterialError, match=message):
        keys.load_private_key(text, "123")


def _plain(key: Any, fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


@pytest.mark.parametrize(
    ("make", "fmt", "pem_type"),
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.PKCS8, "PRIVATE KEY"),
        (
            lambda: ec.generate_private_key(ec.SECP256R1()),
            serialization.PrivateFormat.TraditionalOpenSSL,
            "EC PRIVATE KEY",
        ),
        (
            lambda: rsa.generate_private_key(65537, 2048),
            serialization.PrivateFormat.TraditionalOpenSSL,
            "RSA PRIVATE KEY",
        ),
        (lambda: ed25519.Ed25519PrivateKey.generate(), serialization.PrivateFormat.PKCS8, "PRIVATE KEY"),
    ],
)
def test_unencrypted_private_keys(
    make: Callable[[], Any], fmt: serialization.PrivateFormat, pem_type: str
) -> None:
    key = make()
    text = _plain(key, fmt)
    assert pem_blocks(text)[0].type == pem_type
    loaded = keys.load_private_key(text)
    assert keys.spki_der(loaded.public_key()) == keys.spki_der(key.public_key())


PRIVATE_KEYS: dict[str, Callable[[], Any]] = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
    "ed25519": lambda: ed25519.Ed25519PrivateKey.generate(),
}
EXPECTED_ALGO = {
    "p256": "ECDSA secp256r1 sha256",
    "p384": "ECDSA secp384r1 sha384",
    "p521": "ECDSA secp521r1 sha512",
    "rsa2048": "RSA PKCS#1 v1.5 SHA-256",
    "ed25519": "Ed25519",
}


@pytest.mark.parametrize("name", sorted(PRIVATE_KEYS))
def test_sign_and_verify_every_algorithm(name: str) -> None:
    key = PRIVATE_KEYS[name]()
    public = keys.load_public_key(keys.public_key_pem(key.public_key()))
    sig = keys.sign(b"payload", key)
    assert keys.verify_signature(public, b"payload", sig) == EXPECTED_ALGO[name]
    with pytest.raises(VerificationError) as err:
        keys.verify_signature(public, b"other payload", sig)
    assert err.value.code == "signature-mismatch"


@pytest.mark.parametrize("curve", [ec.SECP384R1(), ec.SECP521R1()])
def test_ecdsa_accepts_sha256_on_larger_curves(curve: ec.EllipticCurve) -> None:
    # cosign verify --key hashes with SHA-256 whatever the curve (Decision 1)
    key = ec.generate_private_key(curve)
    sig = key.sign(b"payload", ec.ECDSA(hashes.SHA256()))
    assert keys.verify_signature(key.public_key(), b"payload", sig).endswith("sha256")
    sig1 = key.sign(b"payload", ec.ECDSA(hashes.SHA1()))
    with pytest.raises(VerificationError):
        keys.verify_signature(key.public_key(), b"payload", sig1)


def test_rsa_pss_is_accepted_as_extension() -> None:
    key = rsa.generate_private_key(65537, 3072)
    sig = key.sign(b"payload", padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    assert keys.verify_signature(key.public_key(), b"payload", sig) == "RSA-PSS SHA-256"


def test_ed25519_failure_names_ed25519ph() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(VerificationError, match="Ed25519ph"):
        keys.verify_signature(key.public_key(), b"payload", key.sign(b"prehashed?"))


def test_fixture_rsa_key_loads() -> None:
    key = keys.load_public_key(pub("some-rsa-key.pub"))
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 4096


def _spki_pem(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"", "no PEM block"),
        (b"-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n", "malformed PEM"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a valid PKIX public key"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "malformed PEM"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "expected a 'PUBLIC KEY'"),
    ],
)
def test_public_key_errors(text: bytes, message: str) -> None:
    with pytest.raises(KeyMaterialError, match=message):
        keys.load_public_key(text)


def _dsa_key() -> Any:
    """A DSA key, which cryptography 48+ deprecates (a key cosign users may still hand us)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return dsa.generate_private_key(2048)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), "RSA key is 1024 bits"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), "unsupported elliptic curve secp256k1"),
        (_dsa_key, "unsupported key type"),
    ],
)
def test_unsupported_public_keys(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(KeyMaterialError, match=message):
        keys.load_public_key(_spki_pem(make().public_key()))


def test_unsupported_private_key_types() -> None:
    text = _plain(rsa.generate_private_key(65537, 1024), serialization.PrivateFormat.PKCS8)
    with pytest.raises(KeyMaterialError, match="1024 bits"):
        keys.load_private_key(text)
    with pytest.raises(KeyMaterialError, match="unsupported PEM type"):
        keys.load_private_key(
            b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
        )
    with pytest.raises(KeyMaterialError, match="exactly one PEM block"):
        keys.load_private_key(b"nothing here")
