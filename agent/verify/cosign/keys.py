"""Keys as cosign uses them: PEM public keys, raw signatures over payload bytes, cosign.key files.

Algorithms (see the "Decisions for ImageGuard" in the signature-formats doc):
- ECDSA P-256/P-384/P-521, ASN.1 DER signatures. Verification accepts SHA-256 (what ``cosign verify --key``
  uses) or the curve's own hash (what cosign signs with); signing uses the curve's own hash.
- RSA >= 2048 bits: PKCS#1 v1.5 with SHA-256 as cosign; RSA-PSS SHA-256 accepted as an extension.
- Ed25519: pure Ed25519 only, both ways. cosign signs with Ed25519ph, which ``cryptography`` cannot verify.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any

import nacl.exceptions
import nacl.secret
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.utils import CryptographyDeprecationWarning

from agent.errors import Code, KeyMaterialError, VerificationError
from agent.verify.cosign.encoding import (
    DecodeError,
    b64decode_strict,
    b64encode,
    parse_json,
    pem_blocks,
    pem_encode,
)

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_CURVE_HASH: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}
MIN_RSA_BITS = 2048

ENCRYPTED_SIGSTORE = "ENCRYPTED SIGSTORE PRIVATE KEY"
ENCRYPTED_COSIGN = "ENCRYPTED COSIGN PRIVATE KEY"
_PLAIN_PRIVATE = ("PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY")
#: scrypt costs cosign's reader accepts (go-securesystemslib CheckParams); r=8, p=1 always
SCRYPT_N_ALLOWED = (32768, 65536, 131072)
SCRYPT_N_DEFAULT = 65536
_SCRYPT_MAXMEM = 256 * 1024 * 1024  # N=131072, r=8 needs 128 MiB; hashlib's default cap is 32 MiB


def check_key(key: object, what: str = "key") -> PublicKey:
    """Return ``key`` if it is a public key cosign accepts, else raise KeyMaterialError naming the problem."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVE_HASH:
            raise KeyMaterialError(
                f"{what}: unsupported elliptic curve {key.curve.name}; use P-256, P-384 or P-521"
            )
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyMaterialError(
                f"{what}: RSA key is {key.key_size} bits; at least {MIN_RSA_BITS} are required"
            )
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise KeyMaterialError(f"{what}: unsupported key type {type(key).__name__}; use ECDSA, RSA or Ed25519")


def load_public_keys(pem: str | bytes, what: str = "public key") -> list[PublicKey]:
    """Every ``PUBLIC KEY`` block of a PEM text (at least one). Other block types are an error."""
    try:
        blocks = pem_blocks(pem)
    except DecodeError as exc:
        raise KeyMaterialError(f"{what}: malformed PEM: {exc}") from None
    if not blocks:
        raise KeyMaterialError(f"{what}: no PEM block found; expected '-----BEGIN PUBLIC KEY-----'")
    keys = []
    for block in blocks:
        if block.type != "PUBLIC KEY":
            raise KeyMaterialError(f"{what}: expected a 'PUBLIC KEY' PEM block, found {block.type!r}")
        keys.append(public_key_from_der(block.body, what))
    return keys


def load_public_key(pem: str | bytes, what: str = "public key") -> PublicKey:
    keys = load_public_keys(pem, what)
    if len(keys) != 1:
        raise KeyMaterialError(f"{what}: expected exactly one PUBLIC KEY, found {len(keys)}")
    return keys[0]


def public_key_from_der(der: bytes, what: str = "public key") -> PublicKey:
    try:
        with warnings.catch_warnings():
            # cryptography 48+ warns on loading a DSA key; check_key refuses it with a clear error
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyMaterialError(f"{what}: not a valid PKIX public key: {exc}") from None
    return check_key(key, what)


def spki_der(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_pem(key: PublicKey) -> bytes:
    """``cosign.pub`` bytes: PEM PUBLIC KEY, 64-column lines, final newline."""
    return pem_encode("PUBLIC KEY", spki_der(key))


def key_fingerprint(key: PublicKey) -> str:
    """sha256 of the PKIX DER, hex: how reports name a key (cosign's key hint is the same hash in base64)."""
    return hashlib.sha256(spki_der(key)).hexdigest()


def describe_key(key: PublicKey) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    return "Ed25519"


def verify_signature(key: PublicKey, payload: bytes, signature: bytes) -> str:
    """Check a raw signature over ``payload``; returns the algorithm that verified, else VerificationError."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        own = _CURVE_HASH[key.curve.name]()
        candidates = [own] if isinstance(own, hashes.SHA256) else [own, hashes.SHA256()]
        for algo in candidates:  # the curve's own hash first; SHA-256 as `cosign verify --key` uses
            try:
                key.verify(signature, payload, ec.ECDSA(algo))
                return f"ECDSA {key.curve.name} {algo.name}"
            except InvalidSignature:
                continue
        expected = " or ".join(a.name.upper() for a in candidates)
        raise VerificationError(
            f"ECDSA signature ({expected}) does not verify with key {key_fingerprint(key)[:16]}",
            code=Code.SIGNATURE_MISMATCH,
        )
    if isinstance(key, rsa.RSAPublicKey):
        schemes: list[tuple[str, padding.AsymmetricPadding]] = [
            ("RSA PKCS#1 v1.5 SHA-256", padding.PKCS1v15()),
            ("RSA-PSS SHA-256", padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO)),
        ]
        for name, pad in schemes:
            try:
                key.verify(signature, payload, pad, hashes.SHA256())
                return name
            except InvalidSignature:
                continue
        raise VerificationError(
            f"RSA signature (PKCS#1 v1.5 or PSS, SHA-256) does not verify with key "
            f"{key_fingerprint(key)[:16]}",
            code=Code.SIGNATURE_MISMATCH,
        )
    try:
        key.verify(signature, payload)
        return "Ed25519"
    except InvalidSignature:
        raise VerificationError(
            f"Ed25519 signature does not verify with key {key_fingerprint(key)[:16]} (only pure Ed25519 is "
            "supported; Ed25519ph signatures, cosign's default for Ed25519 keys, cannot be verified)",
            code=Code.SIGNATURE_MISMATCH,
        ) from None


# --- private keys -------------------------------------------------------------------------------------


def _check_private(key: object, what: str) -> PrivateKey:
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        check_key(key.public_key(), what)
        return key
    raise KeyMaterialError(
        f"{what}: unsupported private key type {type(key).__name__}; use ECDSA, RSA or Ed25519"
    )


def _password_bytes(password: str | bytes | None) -> bytes:
    if password is None:
        return b""
    return password.encode("utf-8") if isinstance(password, str) else password


def _scrypt(password: bytes, salt: bytes, n: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=8, p=1, maxmem=_SCRYPT_MAXMEM, dklen=32)


def load_private_key(
    pem: str | bytes, password: str | bytes | None = None, what: str = "private key"
) -> PrivateKey:
    """Read a cosign.key (encrypted, either PEM type) or an unencrypted PEM private key."""
    try:
        blocks = pem_blocks(pem)
    except DecodeError as exc:
        raise KeyMaterialError(f"{what}: malformed PEM: {exc}") from None
    if len(blocks) != 1:
        raise KeyMaterialError(f"{what}: expected exactly one PEM block, found {len(blocks)}")
    block = blocks[0]
    if block.type in (ENCRYPTED_SIGSTORE, ENCRYPTED_COSIGN):
        der = _decrypt(block.body, _password_bytes(password), what)
        try:
            key = serialization.load_der_private_key(der, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyMaterialError(f"{what}: decrypted content is not a PKCS#8 private key: {exc}") from None
        return _check_private(key, what)
    if block.type in _PLAIN_PRIVATE:
        text = pem if isinstance(pem, bytes) else pem.encode()
        try:
            key = serialization.load_pem_private_key(text, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyMaterialError(f"{what}: cannot read {block.type}: {exc}") from None
        return _check_private(key, what)
    raise KeyMaterialError(
        f"{what}: unsupported PEM type {block.type!r}; expected {ENCRYPTED_SIGSTORE!r}, {ENCRYPTED_COSIGN!r} "
        "or an unencrypted PRIVATE KEY"
    )


def _decrypt(body: bytes, password: bytes, what: str) -> bytes:
    try:
        doc = parse_json(body)
        kdf, cipher = doc["kdf"], doc["cipher"]
        params = kdf["params"]
        n, r, p = params["N"], params["r"], params["p"]
        salt = b64decode_strict(kdf["salt"])
        nonce = b64decode_strict(cipher["nonce"])
        ciphertext = b64decode_strict(doc["ciphertext"])
        kdf_name, cipher_name = kdf["name"], cipher["name"]
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyMaterialError(f"{what}: encrypted key is not cosign's JSON format: {exc!r}") from None
    if kdf_name != "scrypt" or cipher_name != "nacl/secretbox":
        raise KeyMaterialError(f"{what}: unsupported kdf/cipher {kdf_name!r}/{cipher_name!r}")
    if type(n) is not int or n not in SCRYPT_N_ALLOWED or r != 8 or p != 1:
        raise KeyMaterialError(f"{what}: unsupported scrypt parameters N={n}, r={r}, p={p}")
    if len(nonce) != nacl.secret.SecretBox.NONCE_SIZE:
        raise KeyMaterialError(f"{what}: nonce must be {nacl.secret.SecretBox.NONCE_SIZE} bytes")
    box = nacl.secret.SecretBox(_scrypt(password, salt, n))
    try:
        return bytes(box.decrypt(ciphertext, nonce))
    except nacl.exceptions.CryptoError:
        raise KeyMaterialError(f"{what}: decryption failed: wrong password or corrupted key") from None


def encrypt_private_key(key: PrivateKey, password: str | bytes | None, *, n: int = SCRYPT_N_DEFAULT) -> bytes:
    """cosign.key bytes: ``ENCRYPTED SIGSTORE PRIVATE KEY`` holding cosign's JSON (same field order)."""
    if n not in SCRYPT_N_ALLOWED:
        raise KeyMaterialError(f"scrypt N={n} would not be readable by cosign; use one of {SCRYPT_N_ALLOWED}")
    _check_private(key, "private key")
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    salt, nonce = os.urandom(32), os.urandom(nacl.secret.SecretBox.NONCE_SIZE)
    box = nacl.secret.SecretBox(_scrypt(_password_bytes(password), salt, n))
    ciphertext = box.encrypt(der, nonce).ciphertext
    doc: dict[str, Any] = {
        "kdf": {"name": "scrypt", "params": {"N": n, "r": 8, "p": 1}, "salt": b64encode(salt)},
        "cipher": {"name": "nacl/secretbox", "nonce": b64encode(nonce)},
        "ciphertext": b64encode(ciphertext),
    }
    return pem_encode(ENCRYPTED_SIGSTORE, json.dumps(doc, separators=(",", ":")).encode())


def generate_key_pair(password: str | bytes | None) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 key pair as cosign writes it: (cosign.key bytes, cosign.pub bytes)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return encrypt_private_key(key, password), public_key_pem(key.public_key())


def sign(payload: bytes, private_key: PrivateKey) -> bytes:
    """Raw signature over ``payload`` with the hash the key implies (as cosign signs).

    P-256 -> SHA-256, P-384 -> SHA-384, P-521 -> SHA-512 (ASN.1 DER); RSA -> PKCS#1 v1.5 SHA-256;
    Ed25519 -> pure Ed25519 (cosign would use Ed25519ph, which this verifier and ``cryptography`` lack).
    """
    key = _check_private(private_key, "private key")
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(payload, ec.ECDSA(_CURVE_HASH[key.curve.name]()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(payload)
