"""RegistryClient against real docker-registry 2.8 instances (plain, TLS + basic auth, token auth)."""

from __future__ import annotations

import secrets

import pytest

from agent.adapters.registry import OCI_MANIFEST, RegistryClient, Repository
from agent.config import RegistryConfig
from agent.core.digest import Digest
from agent.core.imageref import ImageRef
from agent.errors import RegistryError, RegistryUnreachable
from tests.support.fixtures.registry import (
    RegistryPKI,
    RegistryServer,
    TokenService,
    push_tiny_image,
    push_tiny_index,
)

pytestmark = pytest.mark.integration


def _repo(server: RegistryServer) -> Repository:
    return Repository(server.host, f"test/{secrets.token_hex(4)}")


@pytest.mark.parametrize(
    ("kind", "index"),
    [("oci", False), ("docker", False), ("oci", True), ("docker", True)],
    ids=["oci-manifest", "docker-v2", "oci-index", "docker-manifest-list"],
)
def test_resolve_tag_for_every_manifest_media_type(
    registry_plain: RegistryServer, kind: str, index: bool
) -> None:
    with registry_plain.client() as client:
        repo = _repo(registry_plain)
        pushed = (push_tiny_index if index else push_tiny_image)(client, repo, "v1", kind)
        before = client.request_count
        digest = client.resolve(ImageRef.parse(f"{repo}:v1"))
        assert client.request_count - before == 1
        assert digest == Digest.of(pushed.raw) == pushed.digest
        fetched = client.get_manifest(repo, digest)
        assert fetched.raw == pushed.raw
        assert fetched.media_type == pushed.media_type
        assert fetched.is_index is index
        if index:
            assert [d.digest for d in fetched.manifests()] == [
                Digest(m["digest"]) for m in pushed.parsed["manifests"]
            ]


def test_resolve_digest_reference_needs_no_request(registry_plain: RegistryServer) -> None:
    digest = Digest.of(b"not even in the registry")
    with registry_plain.client() as client:
        assert client.resolve(ImageRef.parse(f"{registry_plain.host}/x/y@{digest}")) == digest
        assert client.request_count == 0


def test_blob_round_trip_and_missing_objects(registry_plain: RegistryServer) -> None:
    with registry_plain.client() as client:
        repo = _repo(registry_plain)
        data = secrets.token_bytes(1000)
        digest = client.push_blob(repo, data)
        assert client.get_blob(repo, digest) == data
        count = client.request_count
        assert client.push_blob(repo, data) == digest
        assert client.request_count == count + 1, "an existing blob is only HEADed"
        assert client.find_manifest(repo, "nope") is None
        with pytest.raises(RegistryError) as info:
            client.get_manifest(repo, "nope")
        assert info.value.code == "registry-not-found"
        with pytest.raises(RegistryError) as info:
            client.get_blob(repo, Digest.of(b"absent"))
        assert info.value.code == "registry-not-found"


def test_blob_over_the_size_limit_is_refused(registry_plain: RegistryServer) -> None:
    with registry_plain.client(max_blob_bytes=1024) as client:
        repo = _repo(registry_plain)
        digest = client.push_blob(repo, b"x" * 2048)
        with pytest.raises(RegistryError) as info:
            client.get_blob(repo, digest)
        assert info.value.code == "registry-response-too-large"
        assert "1024-byte limit" in str(info.value)


def test_plain_http_is_refused_unless_listed_insecure(registry_plain: RegistryServer) -> None:
    ref = ImageRef.parse(f"{registry_plain.host}/test/anything:v1")
    with RegistryClient(timeout=3, deadline=5) as client, pytest.raises(RegistryUnreachable) as info:
        client.resolve(ref)
        assert info.value.code == "registry-tls-error"
    with (
        RegistryClient(insecure_hosts=[registry_plain.host], timeout=3, deadline=5) as client,
        pytest.raises(RegistryError) as not_found,
    ):
        client.resolve(ref)
        assert not_found.value.code == "registry-not-found"
    # 127.0.0.1 is not special: another loopback port listed as insecure does not cover this one
    with (
        RegistryClient(insecure_hosts=["127.0.0.1:1"], timeout=3, deadline=5) as client,
        pytest.raises(RegistryUnreachable),
    ):
        client.resolve(ref)


def test_tls_and_basic_auth_with_custom_ca(registry_tls: RegistryServer) -> None:
    with registry_tls.client() as client:
        repo = _repo(registry_tls)
        pushed = push_tiny_image(client, repo, "v1")
        assert client.resolve(ImageRef.parse(f"{repo}:v1")) == pushed.digest
        count = client.request_count
        client.get_manifest(repo, pushed.digest)
        assert client.request_count == count + 1, "basic auth is sent up front once the challenge is known"


@pytest.mark.parametrize(
    ("overrides", "code", "hint"),
    [
        ({"ca_bundle": None}, "registry-tls-error", "ca_bundle"),
        ({"ca_bundle": "other"}, "registry-tls-error", "ca_bundle"),
        ({"username": None}, "registry-auth-failed", "username"),
        ({"password_file": "wrong"}, "registry-auth-failed", "username"),
    ],
    ids=["no-ca", "wrong-ca", "no-credentials", "wrong-password"],
)
def test_tls_and_auth_failures_are_actionable(
    registry_tls: RegistryServer,
    registry_pki: RegistryPKI,
    tmp_path: object,
    overrides: dict[str, object],
    code: str,
    hint: str,
) -> None:
    if overrides.get("ca_bundle") == "other":
        overrides = {"ca_bundle": registry_pki.other_ca_cert}
    if overrides.get("password_file") == "wrong":
        wrong = registry_tls.password_file.with_name("wrong-password")  # type: ignore[union-attr]
        wrong.write_text("not-" + (registry_tls.password or ""))
        overrides = {"password_file": wrong}
    cfg: RegistryConfig = registry_tls.registry_config(**overrides)
    with (
        RegistryClient(registries=[cfg], timeout=3, deadline=5) as client,
        pytest.raises(RegistryError) as info,
    ):
        client.resolve(ImageRef.parse(f"{registry_tls.host}/test/x:v1"))
    assert info.value.code == code
    assert hint in str(info.value)
    assert registry_tls.password not in str(info.value)


def test_token_auth_pull_and_push(registry_token: tuple[RegistryServer, TokenService]) -> None:
    server, service = registry_token
    repo, other = _repo(server), _repo(server)
    with server.client() as pusher:
        pushed = push_tiny_image(pusher, repo, "v1")
        pushed_other = push_tiny_image(pusher, other, "v1")
    with server.client() as client:
        issued = len(service.issued)
        assert client.resolve(ImageRef.parse(f"{repo}:v1")) == pushed.digest
        assert client.request_count == 3, "401 challenge, token, retry"
        assert len(service.issued) == issued + 1
        client.get_manifest(repo, pushed.digest)
        assert client.request_count == 4, "the token is cached per scope"
        # another repository needs another token, fetched up front since the challenge is remembered
        assert client.resolve(ImageRef.parse(f"{other}:v1")) == pushed_other.digest
        assert client.request_count == 6


def test_token_auth_with_wrong_password(
    registry_token: tuple[RegistryServer, TokenService], tmp_path
) -> None:  # type: ignore[no-untyped-def]
    server, _ = registry_token
    wrong = tmp_path / "pw"
    wrong.write_text("wrong")
    cfg = server.registry_config(password_file=wrong)
    with (
        RegistryClient(registries=[cfg], timeout=3, deadline=5) as client,
        pytest.raises(RegistryError) as info,
    ):
        client.resolve(ImageRef.parse(f"{server.host}/test/x:v1"))
    assert info.value.code == "registry-auth-failed"
    assert "token service refused" in str(info.value)


def test_push_manifest_under_wrong_digest_is_refused(registry_plain: RegistryServer) -> None:
    with registry_plain.client() as client:
        raw = b'{"schemaVersion":2}'
        with pytest.raises(RegistryError, match="refusing to push"):
            client.push_manifest(_repo(registry_plain), Digest.of(b"other"), raw, OCI_MANIFEST)
        assert client.request_count == 0
