"""Issue 3 through the command line: images built on a private dockerd, pushed with ``docker push`` to a real
docker-registry (plain HTTP, and HTTPS from a test CA with htpasswd basic auth), signed with
``imageguard sign`` and checked with ``imageguard verify`` (exit 0 valid, 1 not valid, 2 error).

The negative cases push hand-made signature artifacts in cosign's layout into the same registry (or serve
them from a hostile fake one) and check that the verdict and the named reason are the right ones.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.adapters.registry import OCI_MANIFEST, Repository
from agent.adapters.signatures import attach_signature, signature_tag
from agent.core.digest import Digest
from agent.core.imageref import ImageRef
from agent.verify.cosign import keys
from agent.verify.cosign.artifacts import (
    ANN_BUNDLE,
    ANN_CERTIFICATE,
    ANN_CHAIN,
    ANN_SIGNATURE,
    LegacySignature,
)
from agent.verify.cosign.payload import build_payload
from tests.support.agentproc import cli
from tests.support.cosign import EMAIL, ISSUER_URL, RekorLog, b64, issuer_extensions, make_cert, pem
from tests.support.dockerd import Dockerd
from tests.support.fixtures.proxy import ForwardProxy
from tests.support.fixtures.registry import FakeRegistry, RegistryServer, push_tiny_image, reply
from tests.support.ports import free_port
from tests.support.signing import (
    build_and_push,
    docker_login,
    generate_keys,
    registry_entry,
    write_agent_config,
)

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

NOW = dt.datetime.now(dt.UTC)


def verify_json(config: Path, image: str, *args: str) -> tuple[int, dict[str, Any]]:
    out = cli(config, "verify", image, *args, "--json")
    assert out.returncode in (0, 1, 3), f"exit {out.returncode}: {out.stderr}"
    return out.returncode, json.loads(out.stdout)


# ---- fixtures --------------------------------------------------------------------------------------


@dataclass
class Plain:
    config: Path
    server: RegistryServer
    key: Path
    pub: Path
    password_file: Path
    other_pub: Path
    signed: str  # tag reference
    signed_digest: Digest
    unsigned: str
    unsigned_digest: Digest

    def client(self) -> Any:
        return self.server.client()


@pytest.fixture(scope="module")
def plain(
    tmp_path_factory: pytest.TempPathFactory, dockerd: Dockerd, registry_plain: RegistryServer
) -> Plain:
    d = tmp_path_factory.mktemp("verify-cli")
    config = write_agent_config(
        d / "config.toml",
        {"device": {"id": "cli-test"}, "state": {"dir": str(d / "state")}},
        [registry_entry(registry_plain)],
    )
    key, pub, pw = generate_keys(config, d / "cosign")
    _, other_pub, _ = generate_keys(config, d / "other")
    host = registry_plain.host
    signed, unsigned = f"{host}/cli/signed:1", f"{host}/cli/unsigned:1"
    signed_digest = build_and_push(dockerd, signed, "cli-signed")
    unsigned_digest = build_and_push(dockerd, unsigned, "cli-unsigned")
    out = cli(config, "sign", signed, "--key", str(key), "--passphrase-file", str(pw), "--json", check=True)
    assert json.loads(out.stdout)["image"] == f"{host}/cli/signed@{signed_digest}"
    return Plain(
        config, registry_plain, key, pub, pw, other_pub, signed, signed_digest, unsigned, unsigned_digest
    )


# ---- the happy path ------------------------------------------------------------------------------------


def test_sign_then_verify_by_tag_and_by_digest(plain: Plain) -> None:
    by_digest = f"{plain.server.host}/cli/signed@{plain.signed_digest}"
    for image in (plain.signed, by_digest):
        code, doc = verify_json(plain.config, image, "--key", str(plain.pub))
        assert code == 0, doc
        assert doc["valid"] is True and doc["digest"] == str(plain.signed_digest)
        assert doc["anchor"] == "key-cosign.pub"
        assert doc["signature"]["origin"].endswith(f"cli/signed:{signature_tag(plain.signed_digest)} layer 0")
        assert "ECDSA" in doc["signature"]["signer"] or "P-256" in doc["signature"]["signer"]
    # a digest reference needs no tag lookup: the .sig manifest and its one payload blob
    assert doc["requests"] == 2
    text = cli(plain.config, "verify", by_digest, "--key", str(plain.pub))
    assert text.returncode == 0 and text.stdout.startswith(f"VALID {plain.server.host}/cli/signed@"), text


def test_signature_is_in_cosigns_layout(plain: Plain) -> None:
    """What ``imageguard sign`` pushed is what cosign pushes: one simple-signing layer under ``sha256-<hex>.sig``."""
    repo = Repository(plain.server.host, "cli/signed")
    with plain.client() as client:
        manifest = client.get_manifest(repo, signature_tag(plain.signed_digest))
        assert manifest.media_type == OCI_MANIFEST
        (layer,) = manifest.layers()
        payload = client.get_blob(repo, layer.digest)
    assert layer.media_type == "application/vnd.dev.cosign.simplesigning.v1+json"
    assert payload == build_payload(f"{plain.server.host}/cli/signed", plain.signed_digest)
    signature = base64.b64decode(layer.annotations[ANN_SIGNATURE], validate=True)
    public = keys.load_public_key(plain.pub.read_text())
    keys.verify_signature(public, payload, signature)  # raises if it does not verify


def test_unsigned_wrong_key_and_tlog_required_are_not_valid(plain: Plain) -> None:
    host = plain.server.host
    cases = [
        (f"{host}/cli/unsigned@{plain.unsigned_digest}", ["--key", str(plain.pub)], "no signatures found"),
        (plain.signed, ["--key", str(plain.other_pub)], "signature-mismatch"),
        (plain.signed, ["--key", str(plain.pub), "--require-tlog"], "tlog-required"),
    ]
    for image, args, reason in cases:
        code, doc = verify_json(plain.config, image, *args)
        assert code == 1, (image, args, doc)
        assert doc["valid"] is False and doc["reason"] == "signature-invalid"
        assert any(reason in r for r in doc["reasons"]), (reason, doc["reasons"])
        assert "anchor" not in doc and doc["digest"]
    text = cli(plain.config, "verify", plain.unsigned, "--key", str(plain.pub))
    assert text.returncode == 1 and text.stdout.startswith("NOT VALID"), text


def test_bad_input_is_exit_2_and_changes_nothing(plain: Plain, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pub"
    junk.write_text("-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    for args in (
        [plain.signed, "--key", str(junk)],
        [plain.signed, "--key", str(tmp_path / "missing.pub")],
        ["Not A Reference!", "--key", str(plain.pub)],
    ):
        out = cli(plain.config, "verify", *args)
        assert out.returncode == 2, (args, out)
        assert out.stderr.startswith("imageguard:") and "Traceback" not in out.stderr, out.stderr
    # no anchor given and none in the device policy: an error, not a verdict
    out = cli(plain.config, "verify", plain.signed)
    assert out.returncode == 2 and "no trust anchor" in out.stderr


# ---- hand-made signature artifacts in the registry -------------------------------------------------------


@dataclass
class Material:
    """Signing keys, test CAs valid now (root, intermediate, code-signing leaves) and a test Rekor."""

    key: ec.EllipticCurvePrivateKey
    key_pub: Path
    other_pub: Path
    root_pem: Path
    leaf_key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]  # leaf, intermediate, root
    expired_chain: list[x509.Certificate]  # same hierarchy, the leaf expired an hour ago
    untrusted_chain: list[x509.Certificate]  # same names, another root key
    rekor: RekorLog
    rekor_pub: Path


def _hierarchy(leaf_key: Any, expired: bool = False) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """(valid chain, chain whose leaf has expired), both under one new root named "Test Root"."""
    root_key, inter_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    times = {"not_before": NOW - dt.timedelta(days=1), "not_after": NOW + dt.timedelta(days=30)}
    root = make_cert("Test Root", root_key, "Test Root", root_key, ca=True, path_length=1, **times)
    inter = make_cert("Inter", inter_key, "Test Root", root_key, ca=True, path_length=0, **times)

    def leaf(**kw: Any) -> x509.Certificate:
        return make_cert(
            "",
            leaf_key,
            "Inter",
            inter_key,
            ca=False,
            eku=[ExtendedKeyUsageOID.CODE_SIGNING],
            sans=[x509.RFC822Name(EMAIL)],
            extra=issuer_extensions(),
            **kw,
        )

    old = {"not_before": NOW - dt.timedelta(days=2), "not_after": NOW - dt.timedelta(hours=1)}
    return [leaf(**times), inter, root], [leaf(**old), inter, root]


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    d = tmp_path_factory.mktemp("material")
    key = ec.generate_private_key(ec.SECP256R1())
    (d / "signer.pub").write_bytes(keys.public_key_pem(key.public_key()))
    other = ec.generate_private_key(ec.SECP256R1())
    (d / "other.pub").write_bytes(keys.public_key_pem(other.public_key()))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    chain, expired = _hierarchy(leaf_key)
    untrusted, _ = _hierarchy(leaf_key)
    (d / "root.pem").write_text(pem(chain[2]))
    rekor = RekorLog()
    (d / "rekor.pub").write_text(rekor.pem)
    return Material(
        key,
        d / "signer.pub",
        d / "other.pub",
        d / "root.pem",
        leaf_key,
        chain,
        expired,
        untrusted,
        rekor,
        d / "rekor.pub",
    )


def _sig(payload: bytes, signature: bytes, **annotations: str) -> LegacySignature:
    return LegacySignature(
        "application/vnd.dev.cosign.simplesigning.v1+json",
        payload,
        {ANN_SIGNATURE: b64(signature), **annotations},
        "test",
    )


def _by_key(m: Material, digest: Digest, ref: str) -> LegacySignature:
    payload = build_payload(ref, digest)
    return _sig(payload, keys.sign(payload, m.key))


def _by_cert(chain: list[x509.Certificate], m: Material, digest: Digest, ref: str) -> LegacySignature:
    payload = build_payload(ref, digest)
    return _sig(
        payload,
        keys.sign(payload, m.leaf_key),
        **{ANN_CERTIFICATE: pem(chain[0]), ANN_CHAIN: pem(*chain[1:])},
    )


def _with_rekor(
    sig: LegacySignature, m: Material, signer_pem: bytes, *, forge: bool = False, at: dt.datetime = NOW
) -> LegacySignature:
    signature = base64.b64decode(sig.annotations[ANN_SIGNATURE])
    bundle = m.rekor.legacy_bundle(
        signature=signature,
        payload=sig.payload,
        signer_pem=signer_pem,
        integrated_time=int(at.timestamp()) - 60,
        forge=forge,
    )
    return LegacySignature(sig.media_type, sig.payload, {**sig.annotations, ANN_BUNDLE: bundle}, sig.origin)


def _tampered_payload(m: Material, digest: Digest, ref: str) -> LegacySignature:
    good = _by_key(m, digest, ref)
    payload = good.payload.replace(b'"docker-reference":"', b'"docker-reference":"evil.example/')
    assert payload != good.payload and json.loads(payload)
    return LegacySignature(good.media_type, payload, good.annotations, good.origin)


def _tampered_signature(m: Material, digest: Digest, ref: str) -> LegacySignature:
    good = _by_key(m, digest, ref)
    der = bytearray(base64.b64decode(good.annotations[ANN_SIGNATURE]))
    der[8] ^= 0x01  # inside r: still well-formed DER, no longer the signature
    return _sig(good.payload, bytes(der))


def _leaf_pem(chain: list[x509.Certificate]) -> bytes:
    return chain[0].public_bytes(serialization.Encoding.PEM)


KEY = ["--key", "{key_pub}"]
CA = ["--ca", "{root_pem}", "--any-identity"]  # cases about the chain, not the identity
CA_ONLY = ["--ca", "{root_pem}"]
REKOR = ["--rekor-key", "{rekor_pub}"]
CASES: list[tuple[str, Any, list[str], int, str]] = [
    ("key-valid", _by_key, KEY, 0, ""),
    ("wrong-key", _by_key, ["--key", "{other_pub}"], 1, "signature-mismatch"),
    ("tampered-payload", _tampered_payload, KEY, 1, "signature-mismatch"),
    ("tampered-signature", _tampered_signature, KEY, 1, "signature-mismatch"),
    ("other-digest", lambda m, d, r: _by_key(m, Digest.of(b"another image"), r), KEY, 1, "digest-mismatch"),
    (
        "ca-valid",
        lambda m, d, r: _by_cert(m.chain, m, d, r),
        [*CA_ONLY, "--certificate-identity", EMAIL, "--certificate-oidc-issuer", ISSUER_URL],
        0,
        "",
    ),
    (
        "ca-identity-regexp",
        lambda m, d, r: _by_cert(m.chain, m, d, r),
        [*CA_ONLY, "--certificate-identity-regexp", r".*@example\.com"],
        0,
        "",
    ),
    ("ca-untrusted", lambda m, d, r: _by_cert(m.untrusted_chain, m, d, r), CA, 1, "certificate-untrusted"),
    ("ca-expired", lambda m, d, r: _by_cert(m.expired_chain, m, d, r), CA, 1, "certificate-expired"),
    (
        "ca-wrong-identity",
        lambda m, d, r: _by_cert(m.chain, m, d, r),
        [*CA_ONLY, "--certificate-identity", "mallory@example.com"],
        1,
        "identity-mismatch",
    ),
    (
        "ca-wrong-issuer",
        lambda m, d, r: _by_cert(m.chain, m, d, r),
        [*CA_ONLY, "--certificate-oidc-issuer", "https://other.example"],
        1,
        "identity-mismatch",
    ),
    (
        "ca-expired-now-valid-at-tlog-time",
        lambda m, d, r: _with_rekor(
            _by_cert(m.expired_chain, m, d, r), m, _leaf_pem(m.expired_chain), at=NOW - dt.timedelta(hours=2)
        ),
        [*CA, *REKOR, "--require-tlog"],
        0,
        "",
    ),
    (
        "rekor-valid",
        lambda m, d, r: _with_rekor(_by_key(m, d, r), m, keys.public_key_pem(m.key.public_key())),
        [*KEY, *REKOR, "--require-tlog"],
        0,
        "",
    ),
    ("tlog-required-missing", _by_key, [*KEY, *REKOR, "--require-tlog"], 1, "tlog-required"),
    (
        "forged-set",
        lambda m, d, r: _with_rekor(_by_key(m, d, r), m, keys.public_key_pem(m.key.public_key()), forge=True),
        [*KEY, *REKOR],
        1,
        "tlog-invalid",
    ),
]


@pytest.mark.parametrize(("name", "make", "args", "exit_code", "reason"), CASES, ids=[c[0] for c in CASES])
def test_signature_artifacts_through_the_registry(
    plain: Plain, material: Material, name: str, make: Any, args: list[str], exit_code: int, reason: str
) -> None:
    repo = Repository(plain.server.host, f"neg/{name}")
    with plain.client() as client:
        image = push_tiny_image(client, repo, "1")
        ref = ImageRef.parse(f"{repo}@{image.digest}")
        attach_signature(client, ref, image.digest, make(material, image.digest, str(repo)))
    paths = {k: str(getattr(material, k)) for k in ("key_pub", "other_pub", "root_pem", "rekor_pub")}
    code, doc = verify_json(plain.config, str(ref), *(a.format(**paths) for a in args))
    assert code == exit_code, doc
    assert doc["digest"] == str(image.digest)
    if exit_code == 0:
        assert doc["valid"] and doc["reason"] == "signature-verified" and doc["signature"]["origin"]
    else:
        assert doc["reason"] == "signature-invalid"
        assert any(reason in r for r in doc["reasons"]), doc["reasons"]


def test_a_ca_without_an_identity_is_refused_before_anything_is_fetched(
    plain: Plain, material: Material
) -> None:
    ref = f"{plain.server.host}/neg/ca-nobody@{Digest.of(b'never fetched')}"
    out = cli(plain.config, "verify", ref, "--ca", str(material.root_pem))
    assert out.returncode == 2, out.stderr
    assert "needs at least one identity" in out.stderr and "any_identity" in out.stderr


def test_registry_serving_wrong_bytes(plain: Plain, material: Material, fake_registry: FakeRegistry) -> None:
    """A hostile registry: the signature manifest names a payload blob and serves other bytes for it."""
    digest = Digest.of(b"some image manifest")
    good = _by_key(material, digest, f"{fake_registry.host}/evil/app")
    forged = good.payload.replace(b'"docker-reference":"', b'"docker-reference":"x')
    layer = {
        "mediaType": good.media_type,
        "size": len(good.payload),
        "digest": str(Digest.of(good.payload)),
        "annotations": dict(good.annotations),
    }
    config = b"{}"
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "size": 2,
                "digest": str(Digest.of(config)),
            },
            "layers": [layer],
        }
    ).encode()

    def respond(h: Any) -> None:
        if h.path.endswith(f"/manifests/{signature_tag(digest)}"):
            reply(
                h,
                200,
                manifest,
                {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": str(Digest.of(manifest))},
            )
        elif "/blobs/" in h.path:
            reply(
                h,
                200,
                forged[: len(good.payload)].ljust(len(good.payload)),
                {"Content-Type": "application/octet-stream"},
            )
        else:
            reply(h, 404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}')

    fake_registry.respond = respond
    image = f"{fake_registry.host}/evil/app@{digest}"
    code, doc = verify_json(
        plain.config, image, "--key", str(material.key_pub), "--insecure-registry", fake_registry.host
    )
    assert code == 1 and doc["reason"] == "signature-invalid", doc
    assert any("does not match its digest" in r for r in doc["reasons"]), doc["reasons"]
    assert any("/blobs/" in p for p in fake_registry.paths)


def test_unreachable_registry(plain: Plain) -> None:
    host = f"127.0.0.1:{free_port()}"
    image = f"{host}/app@{plain.signed_digest}"
    code, doc = verify_json(plain.config, image, "--key", str(plain.pub), "--insecure-registry", host)
    assert code == 3 and doc["reason"] == "registry-unreachable", doc  # could not check, not "not valid"
    assert any("unreachable" in r and host in r for r in doc["reasons"]), doc["reasons"]
    # by tag: the tag cannot be resolved either
    code, doc = verify_json(
        plain.config, f"{host}/app:1", "--key", str(plain.pub), "--insecure-registry", host
    )
    assert code == 3 and doc["reason"] == "registry-unreachable" and doc["digest"] is None


# ---- HTTPS from a test CA + htpasswd basic auth -------------------------------------------------------------


@contextlib.contextmanager
def docker_trusts(host: str, ca: Path) -> Iterator[None]:
    """Let the engine push to ``host`` over TLS from the test CA: /etc/docker/certs.d is global, so the
    directory for this one host:port is removed afterwards (and certs.d itself if we created it)."""
    root = Path("/etc/docker/certs.d")
    created_root = not root.exists()
    target = root / host
    target.mkdir(parents=True)
    try:
        shutil.copy(ca, target / "ca.crt")
        yield
    finally:
        shutil.rmtree(target, ignore_errors=True)
        if created_root:
            with contextlib.suppress(OSError):
                root.rmdir()


@dataclass
class Tls:
    server: RegistryServer
    config: Path  # CA bundle and credentials
    config_ca_only: Path  # CA bundle, no credentials
    config_nothing: Path  # the registry is not configured at all
    image: str
    digest: Digest


@pytest.fixture(scope="module")
def tls(
    tmp_path_factory: pytest.TempPathFactory, dockerd: Dockerd, registry_tls: RegistryServer, plain: Plain
) -> Iterator[Tls]:
    d = tmp_path_factory.mktemp("verify-tls")
    server = registry_tls
    base = {"device": {"id": "cli-test"}, "state": {"dir": str(d / "state")}}
    configs = [
        write_agent_config(d / "full.toml", base, [registry_entry(server)]),
        write_agent_config(d / "ca.toml", base, [{"host": server.host, "ca_bundle": str(server.ca_bundle)}]),
        write_agent_config(d / "none.toml", base),
    ]
    image = f"{server.host}/tls/app:1"
    env = {**dockerd.env, "DOCKER_CONFIG": str(d / "docker-config")}  # the login stays in this test
    assert server.ca_bundle is not None and server.password is not None and server.username is not None
    with docker_trusts(server.host, server.ca_bundle):
        docker_login(server, env)
        digest = build_and_push(dockerd, image, "cli-tls", env)
    # the signer passes the credentials as flags; the CA comes from the config
    out = cli(
        configs[1],
        "sign",
        image,
        "--key",
        str(plain.key),
        "--passphrase-file",
        str(plain.password_file),
        "--registry-username",
        server.username,
        "--registry-password-file",
        str(server.password_file),
    )
    assert out.returncode == 0, out.stderr
    yield Tls(server, *configs, image, digest)


def test_tls_basic_auth_sign_and_verify(tls: Tls, plain: Plain) -> None:
    for image in (tls.image, f"{tls.server.host}/tls/app@{tls.digest}"):
        code, doc = verify_json(tls.config, image, "--key", str(plain.pub))
        assert code == 0 and doc["digest"] == str(tls.digest), doc
    # credentials as flags instead of configuration
    assert tls.server.username and tls.server.password_file
    code, doc = verify_json(
        tls.config_ca_only,
        tls.image,
        "--key",
        str(plain.pub),
        "--registry-username",
        tls.server.username,
        "--registry-password-file",
        str(tls.server.password_file),
    )
    assert code == 0, doc


def test_tls_without_credentials_or_ca(tls: Tls, plain: Plain) -> None:
    code, doc = verify_json(tls.config_ca_only, tls.image, "--key", str(plain.pub))
    assert code == 1 and doc["reason"] == "signature-invalid", doc
    assert any("requires a login" in r for r in doc["reasons"]), doc["reasons"]
    code, doc = verify_json(tls.config_nothing, tls.image, "--key", str(plain.pub))
    assert code == 3 and doc["reason"] == "registry-unreachable", doc
    assert any("TLS" in r and "ca_bundle" in r for r in doc["reasons"]), doc["reasons"]
    assert tls.server.password not in json.dumps(doc)


# ---- the network a gateway really has ----------------------------------------------------------------------


def _verify_env(
    config: Path, image: str, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")
    }
    return subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(config), "verify", image, *args],
        capture_output=True, text=True, timeout=60, env={**clean, **env}, cwd=REPO,
    )  # fmt: skip


def test_registry_requests_go_through_the_proxy_from_the_environment(plain: Plain) -> None:
    proxy = ForwardProxy()
    try:
        out = _verify_env(plain.config, plain.signed, {"HTTP_PROXY": proxy.url}, "--key", str(plain.pub))
        assert out.returncode == 0, out.stdout + out.stderr
        assert proxy.seen and all(plain.server.host in s for s in proxy.seen), proxy.seen
        before = len(proxy.seen)
        host = plain.server.host.split(":")[0]
        out = _verify_env(
            plain.config, plain.signed, {"HTTP_PROXY": proxy.url, "NO_PROXY": host}, "--key", str(plain.pub)
        )
        assert out.returncode == 0 and len(proxy.seen) == before, "NO_PROXY is honoured"
    finally:
        proxy.close()


def test_a_registry_proxy_from_the_configuration(plain: Plain, tmp_path: Path) -> None:
    proxy = ForwardProxy()
    try:
        config = write_agent_config(
            tmp_path / "config.toml",
            {"device": {"id": "proxied"}, "state": {"dir": str(tmp_path / "state")}},
            [{**registry_entry(plain.server), "proxy": proxy.url}],
        )
        out = _verify_env(config, plain.signed, {}, "--key", str(plain.pub))
        assert out.returncode == 0, out.stdout + out.stderr
        assert proxy.seen
    finally:
        proxy.close()


def test_credentials_docker_login_stored_are_used(tls: Tls, plain: Plain, tmp_path: Path) -> None:
    """The configuration names the registry's CA but no credentials: the docker CLI's are used."""
    docker_config = tmp_path / "docker"
    docker_config.mkdir()
    auth = base64.b64encode(f"{tls.server.username}:{tls.server.password}".encode()).decode()
    (docker_config / "config.json").write_text(json.dumps({"auths": {tls.server.host: {"auth": auth}}}))
    refused = _verify_env(tls.config_ca_only, tls.image, {}, "--key", str(plain.pub), "--json")
    assert refused.returncode == 1 and "requires a login" in refused.stdout
    out = _verify_env(
        tls.config_ca_only, tls.image, {"DOCKER_CONFIG": str(docker_config)}, "--key", str(plain.pub)
    )
    assert out.returncode == 0, out.stdout + out.stderr
