"""Test material for the cosign core: the shared interop fixtures, a test CA, a test Rekor, DSSE bundles."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.core.anchors import Identity, TrustAnchor
from agent.core.digest import Digest
from agent.verify.cosign import keys
from agent.verify.cosign.artifacts import ANN_SIGNATURE, BundleSignature, LegacySignature
from agent.verify.cosign.bundle import COSIGN_SIGN_PREDICATE, IN_TOTO_PAYLOAD_TYPE, pae

# copied into the repository with their README (provenance, licence, expected verdicts)
INTEROP = Path(__file__).resolve().parents[1] / "vectors" / "cosign"
CASES = INTEROP / "cases"
KEYS = INTEROP / "keys"
_HEADER = b"\x00sigstore-json\n"
BUNDLE_V03 = "application/vnd.dev.sigstore.bundle.v0.3+json"
T0 = dt.datetime(2025, 6, 1, 12, 0, 0, tzinfo=dt.UTC)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def read_dir_signature(path: Path) -> LegacySignature:
    """containers/image ``dir:`` signature file -> one .sig layer (mediaType, payload, annotations)."""
    raw = path.read_bytes()
    assert raw.startswith(_HEADER), path
    doc = json.loads(raw[len(_HEADER) :].decode().strip())
    return LegacySignature(
        media_type=doc["mimeType"],
        payload=base64.b64decode(doc["payload"], validate=True),
        annotations=doc.get("annotations") or {},
        origin=f"{path.parent.name}/{path.name}",
    )


def load_case(name: str) -> tuple[Digest | None, list[LegacySignature]]:
    """A fixture directory: (sha256 of manifest.json or None, its signature-N files in order)."""
    d = CASES / name
    manifest = d / "manifest.json"
    digest = Digest.of(manifest.read_bytes()) if manifest.exists() else None
    sigs = sorted(d.glob("signature-*"), key=lambda p: int(p.name.split("-")[1]))
    return digest, [read_dir_signature(p) for p in sigs]


def key_anchor(*pems: str, **kw: Any) -> TrustAnchor:
    return TrustAnchor(name=kw.pop("name", "test-key"), kind="key", pem="".join(pems), **kw)


def pub(name: str) -> str:
    return (KEYS / name).read_text()


def legacy(
    payload: bytes, signature: bytes | str | None, origin: str = "test layer", **ann: str
) -> LegacySignature:
    annotations = dict(ann)
    if signature is not None:
        annotations[ANN_SIGNATURE] = signature if isinstance(signature, str) else b64(signature)
    return LegacySignature("application/vnd.dev.cosign.simplesigning.v1+json", payload, annotations, origin)


def now_ts(t: dt.datetime = T0) -> float:
    return t.timestamp()


# --- a test PKI ---------------------------------------------------------------------------------------

OID_ISSUER_V1 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
OID_ISSUER_V2 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")


def _name(cn: str) -> x509.Name:
    # Fulcio leaves have an empty subject; so do ours when cn is ""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])


def make_cert(
    subject: str,
    key: Any,
    issuer: str,
    issuer_key: Any,
    *,
    ca: bool,
    path_length: int | None = None,
    not_before: dt.datetime = T0 - dt.timedelta(days=30),
    not_after: dt.datetime = T0 + dt.timedelta(days=30),
    eku: list[x509.ObjectIdentifier] | None = None,
    sans: list[x509.GeneralName] | None = None,
    extra: list[x509.ExtensionType] | None = None,
    key_usage: x509.KeyUsage | str | None = "default",
) -> x509.Certificate:
    """``key_usage``: "default" (keyCertSign + cRLSign for a CA, digitalSignature otherwise), None (no
    keyUsage extension at all) or one given."""
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    )
    if isinstance(key_usage, x509.KeyUsage):
        b = b.add_extension(key_usage, critical=True)
    elif key_usage == "default" and ca:
        b = b.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    elif key_usage == "default":
        b = b.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for ext in extra or []:
        b = b.add_extension(ext, critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


ISSUER_URL = "https://issuer.example"
EMAIL = "signer@example.com"
WORKFLOW = "https://github.com/example/app/.github/workflows/release.yml@refs/heads/main"


def issuer_extensions(v2: str | None = ISSUER_URL, v1: str | None = ISSUER_URL) -> list[x509.ExtensionType]:
    out: list[x509.ExtensionType] = []
    if v1 is not None:
        out.append(x509.UnrecognizedExtension(OID_ISSUER_V1, v1.encode()))
    if v2 is not None:
        raw = v2.encode()
        out.append(x509.UnrecognizedExtension(OID_ISSUER_V2, bytes([0x0C, len(raw)]) + raw))
    return out


@dataclass
class Pki:
    root_key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    inter_key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    leaf_key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def __post_init__(self) -> None:
        self.root = make_cert("Test Root", self.root_key, "Test Root", self.root_key, ca=True, path_length=1)
        self.inter = make_cert(
            "Test Intermediate", self.inter_key, "Test Root", self.root_key, ca=True, path_length=0
        )

    def leaf(self, **kw: Any) -> x509.Certificate:
        kw.setdefault("eku", [ExtendedKeyUsageOID.CODE_SIGNING])
        kw.setdefault("sans", [x509.RFC822Name(EMAIL), x509.UniformResourceIdentifier(WORKFLOW)])
        kw.setdefault("extra", issuer_extensions())
        return make_cert("", self.leaf_key, "Test Intermediate", self.inter_key, ca=False, **kw)

    def anchor(self, identities: tuple[Identity, ...] = (), **kw: Any) -> TrustAnchor:
        kw.setdefault("any_identity", not identities)
        return TrustAnchor(name="test-ca", kind="ca", pem=pem(self.root), identities=identities, **kw)


# --- a test Rekor -------------------------------------------------------------------------------------


class RekorLog:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.pem = keys.public_key_pem(self.key.public_key()).decode()
        self.log_id = hashlib.sha256(keys.spki_der(self.key.public_key())).hexdigest()

    def set_for(
        self, body_b64: str, integrated_time: int, log_index: int, log_id: str | None = None
    ) -> bytes:
        doc = {
            "body": body_b64,
            "integratedTime": integrated_time,
            "logID": log_id or self.log_id,
            "logIndex": log_index,
        }
        return self.key.sign(rfc8785.dumps(doc), ec.ECDSA(hashes.SHA256()))

    def legacy_bundle(
        self,
        *,
        signature: bytes,
        payload: bytes,
        signer_pem: bytes,
        integrated_time: int,
        kind: str = "hashedrekord",
        log_index: int = 7,
        forge: bool = False,
    ) -> str:
        spec: dict[str, Any] = {
            "data": {"hash": {"algorithm": "sha256", "value": hashlib.sha256(payload).hexdigest()}},
            "signature": {"content": b64(signature), "publicKey": {"content": b64(signer_pem)}},
        }
        if kind == "rekord":
            spec["signature"]["format"] = "x509"
        body = b64(json.dumps({"apiVersion": "0.0.1", "kind": kind, "spec": spec}).encode())
        set_sig = self.set_for(body, integrated_time, log_index)
        if forge:
            set_sig = self.set_for(body, integrated_time + 1, log_index)
        return json.dumps(
            {
                "SignedEntryTimestamp": b64(set_sig),
                "Payload": {
                    "body": body,
                    "integratedTime": integrated_time,
                    "logIndex": log_index,
                    "logID": self.log_id,
                },
            }
        )


# --- RFC 6962 Merkle trees ----------------------------------------------------------------------------


def _leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def merkle_root(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return _leaf(leaves[0])
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + merkle_root(leaves[:k]) + merkle_root(leaves[k:])).digest()


def merkle_path(m: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if m < k:
        return [*merkle_path(m, leaves[:k]), merkle_root(leaves[k:])]
    return [*merkle_path(m - k, leaves[k:]), merkle_root(leaves[:k])]


# --- DSSE bundles -------------------------------------------------------------------------------------


def statement(digest: Digest, predicate_type: str = COSIGN_SIGN_PREDICATE, name: str | None = None) -> bytes:
    subject: dict[str, Any] = {"digest": {"sha256": digest.hex}}
    if name:
        subject["name"] = name
    return json.dumps(
        {
            "_type": "https://in-toto.io/Statement/v1",
            "subject": [subject],
            "predicateType": predicate_type,
            "predicate": {},
        }
    ).encode()


def dsse_bundle(
    private_key: Any,
    payload: bytes,
    *,
    certificates: list[x509.Certificate] | None = None,
    extra_signatures: int = 0,
    rekor: RekorLog | None = None,
    integrated_time: int = int(T0.timestamp()),
    proof: bool = True,
    tamper_proof: bool = False,
    bind_signature: bytes | None = None,
    media_type: str = BUNDLE_V03,
) -> BundleSignature:
    sig = keys.sign(pae(IN_TOTO_PAYLOAD_TYPE, payload), private_key)
    material: dict[str, Any]
    if certificates:
        material = {
            "certificate": {"rawBytes": b64(certificates[0].public_bytes(serialization.Encoding.DER))}
        }
        signer_pem = certificates[0].public_bytes(serialization.Encoding.PEM)
    else:
        material = {
            "publicKey": {"hint": b64(hashlib.sha256(keys.spki_der(private_key.public_key())).digest())}
        }
        signer_pem = keys.public_key_pem(private_key.public_key())
    if rekor is not None:
        body = json.dumps(
            {
                "apiVersion": "0.0.1",
                "kind": "dsse",
                "spec": {
                    "envelopeHash": {"algorithm": "sha256", "value": "00" * 32},
                    "payloadHash": {"algorithm": "sha256", "value": hashlib.sha256(payload).hexdigest()},
                    "signatures": [{"signature": b64(bind_signature or sig), "verifier": b64(signer_pem)}],
                },
            }
        ).encode()
        log_index = 5
        entry: dict[str, Any] = {
            "logIndex": str(log_index),
            "logId": {"keyId": b64(bytes.fromhex(rekor.log_id))},
            "kindVersion": {"kind": "dsse", "version": "0.0.1"},
            "integratedTime": str(integrated_time),
            "inclusionPromise": {
                "signedEntryTimestamp": b64(rekor.set_for(b64(body), integrated_time, log_index))
            },
            "canonicalizedBody": b64(body),
        }
        if proof:
            leaves = [b"entry-%d" % i for i in range(11)]
            leaves[log_index] = body
            root = merkle_root(leaves)
            hashes_ = merkle_path(log_index, leaves)
            if tamper_proof:
                hashes_[0] = hashlib.sha256(hashes_[0]).digest()
            entry["inclusionProof"] = {
                "logIndex": str(log_index),
                "rootHash": b64(root),
                "treeSize": str(len(leaves)),
                "hashes": [b64(h) for h in hashes_],
                "checkpoint": {
                    "envelope": f"rekor.test - 1\n{len(leaves)}\n{b64(root)}\n\n— rekor.test AAAA\n"
                },
            }
        material["tlogEntries"] = [entry]
    sigs = [{"sig": b64(sig), "keyid": ""}] + [{"sig": b64(sig), "keyid": "x"}] * extra_signatures
    doc = {
        "mediaType": media_type,
        "verificationMaterial": material,
        "dsseEnvelope": {"payload": b64(payload), "payloadType": IN_TOTO_PAYLOAD_TYPE, "signatures": sigs},
    }
    return BundleSignature(BUNDLE_V03, json.dumps(doc).encode(), origin="test bundle")


REKOR_FOR_FUZZ = RekorLog()
