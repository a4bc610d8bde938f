"""cosign signature layouts in a real docker-registry 2.8: the shared vectors, written and read back."""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path

import pytest

from agent.adapters.registry import OCI_INDEX, OCI_MANIFEST, Descriptor, RegistryClient, Repository, go_json
from agent.adapters.signatures import (
    BUNDLE_V03,
    attach_bundle,
    attach_signature,
    fetch_bundles,
    fetch_legacy,
    fetch_signatures,
    referrers_tag,
    signature_tag,
)
from agent.core.digest import Digest
from agent.core.imageref import ImageRef
from agent.errors import RegistryError
from agent.verify.cosign.artifacts import (
    SIMPLE_SIGNING_MEDIA_TYPE,
    BundleSignature,
    LegacySignature,
    SignatureSet,
)
from tests.support.cosign import CASES
from tests.support.fixtures.registry import RegistryServer, push_tiny_image

pytestmark = pytest.mark.integration

HEADER = b"\x00sigstore-json\n"
VALID_DIGEST = Digest("sha256:634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00")


def load_dir_signature(path: Path) -> LegacySignature:
    """containers/image ``dir:`` signature file -> one cosign layer."""
    raw = path.read_bytes()
    assert raw.startswith(HEADER), path
    doc = json.loads(raw[len(HEADER) :])
    return LegacySignature(
        doc["mimeType"], base64.b64decode(doc["payload"], validate=True), doc["annotations"]
    )


def case_digest(case: Path) -> Digest:
    manifest = case / "manifest.json"
    return Digest.of(manifest.read_bytes()) if manifest.exists() else VALID_DIGEST


def _ref(server: RegistryServer) -> ImageRef:
    return ImageRef.parse(f"{server.host}/vectors/{secrets.token_hex(4)}:latest")


SIGNED_CASES = sorted(p.name for p in CASES.iterdir() if p.is_dir())


@pytest.mark.parametrize("case", SIGNED_CASES)
def test_shared_vectors_round_trip_byte_identical(registry_plain: RegistryServer, case: str) -> None:
    directory = CASES / case
    signatures = [load_dir_signature(p) for p in sorted(directory.glob("signature-*"))]
    digest = case_digest(directory)
    ref = _ref(registry_plain)
    with registry_plain.client() as client:
        for sig in signatures:
            attach_signature(client, ref, digest, sig)
        before = client.request_count
        found = fetch_signatures(client, ref.with_digest(digest), digest, enough=lambda s: True)
        assert client.request_count - before == 1 + len(signatures), "one manifest GET + one GET per layer"
    assert found.digest == digest
    assert found.repository == ref.name
    assert [(s.media_type, s.payload, dict(s.annotations)) for s in found.signatures] == [
        (s.media_type, s.payload, dict(s.annotations)) for s in signatures
    ]
    assert all(isinstance(s, LegacySignature) and signature_tag(digest) in s.origin for s in found.signatures)


def test_signature_manifest_matches_cosign_layout(registry_plain: RegistryServer) -> None:
    sig = load_dir_signature(CASES / "dir-img-cosign-valid/signature-1")
    ref = _ref(registry_plain)
    repo = Repository.of(ref)
    with registry_plain.client() as client:
        pushed = attach_signature(client, ref, VALID_DIGEST, sig)
        manifest = client.get_manifest(
            repo, "sha256-634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00.sig"
        )
        config = client.get_blob(repo, manifest.config().digest)  # type: ignore[union-attr]
    assert manifest.digest == pushed
    assert manifest.media_type == OCI_MANIFEST
    # the interop README's example layer, and go-containerregistry's field order
    layer = manifest.parsed["layers"][0]
    assert list(layer) == ["mediaType", "size", "digest", "annotations"]
    assert layer["mediaType"] == SIMPLE_SIGNING_MEDIA_TYPE
    assert layer["size"] == 261
    assert layer["digest"] == "sha256:cf482371b51a7633b3f02e29b87fc3f4a18b3f127af61cb114af5f2c04fcdd75"
    assert layer["annotations"]["dev.cosignproject.cosign/signature"].startswith("MEYCIQDm")
    assert list(manifest.parsed) == ["schemaVersion", "mediaType", "config", "layers"]
    assert manifest.parsed["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert b" " not in manifest.raw, "compact JSON, as Go writes it"
    assert config == (
        b'{"architecture":"","created":"0001-01-01T00:00:00Z","history":[{"created":"0001-01-01T00:00:00Z"}],'
        b'"os":"","rootfs":{"type":"layers","diff_ids":'
        b'["sha256:cf482371b51a7633b3f02e29b87fc3f4a18b3f127af61cb114af5f2c04fcdd75"]},"config":{}}'
    )


def test_attach_is_idempotent_and_appends(registry_plain: RegistryServer) -> None:
    first = load_dir_signature(CASES / "dir-img-cosign-valid-2/signature-1")
    second = load_dir_signature(CASES / "dir-img-cosign-valid-2/signature-2")
    ref = _ref(registry_plain)
    with registry_plain.client() as client:
        one = attach_signature(client, ref, VALID_DIGEST, first)
        assert attach_signature(client, ref, VALID_DIGEST, first) == one
        two = attach_signature(client, ref, VALID_DIGEST, second)
        assert two != one
        assert attach_signature(client, ref, VALID_DIGEST, second) == two
        assert [s.payload for s in fetch_legacy(client, Repository.of(ref), VALID_DIGEST)] == [
            first.payload,
            second.payload,
        ]
        manifest = client.get_manifest(Repository.of(ref), signature_tag(VALID_DIGEST))
        config = json.loads(client.get_blob(Repository.of(ref), manifest.config().digest))  # type: ignore[union-attr]
    assert config["rootfs"]["diff_ids"] == [str(Digest.of(first.payload)), str(Digest.of(second.payload))]
    assert len(config["history"]) == 2


def test_no_signatures_is_an_empty_set_in_four_requests(registry_plain: RegistryServer) -> None:
    ref = _ref(registry_plain)
    with registry_plain.client() as client:
        found = fetch_signatures(client, ref, VALID_DIGEST)
        # .sig 404, referrers API 404 (docker-registry 2.8 has none), fallback tag 404
        assert client.request_count == 3
    assert found == SignatureSet(VALID_DIGEST, (), ref.name)


def _bundle(n: int) -> bytes:
    return json.dumps({"mediaType": BUNDLE_V03, "n": n, "nonce": secrets.token_hex(4)}).encode()


def test_bundle_referrer_round_trip_through_tag_schema_fallback(registry_plain: RegistryServer) -> None:
    ref = _ref(registry_plain)
    repo = Repository.of(ref)
    subject = Descriptor(OCI_MANIFEST, VALID_DIGEST, 428)  # the vectors' image cannot be pushed
    bundles = [_bundle(1), _bundle(2)]
    with registry_plain.client() as client:
        referrers = [attach_bundle(client, ref, VALID_DIGEST, b, subject=subject) for b in bundles]
        assert not client.last_push_indexed_subject, "docker-registry 2.8 has no referrers API"
        attach_bundle(
            client, ref, VALID_DIGEST, bundles[0], subject=subject, annotations={}
        )  # other manifest
        index = client.get_manifest(repo, referrers_tag(VALID_DIGEST))
        before = client.request_count
        found = fetch_bundles(client, repo, VALID_DIGEST)
        # referrers API 404 + fallback index + (manifest + blob) per bundle
        assert client.request_count - before == 2 + 2 * 3
        referrer = client.get_manifest(repo, referrers[0])
    assert index.media_type == OCI_INDEX
    entries = index.manifests()
    assert [e.digest for e in entries] == sorted(e.digest for e in entries)
    assert {e.artifact_type for e in entries} == {BUNDLE_V03}
    assert set(referrers) <= {e.digest for e in entries}
    assert sorted(b.bundle for b in found) == sorted([*bundles, bundles[0]])
    assert all(isinstance(b, BundleSignature) and b.media_type == BUNDLE_V03 for b in found)
    doc = referrer.parsed
    assert doc["artifactType"] == BUNDLE_V03
    assert doc["config"] == {
        "mediaType": "application/vnd.oci.empty.v1+json",
        "size": 2,
        "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
    }
    assert doc["subject"] == {"mediaType": OCI_MANIFEST, "size": 428, "digest": str(VALID_DIGEST)}
    assert doc["annotations"]["dev.sigstore.bundle.predicateType"] == "https://sigstore.dev/cosign/sign/v1"


def test_non_bundle_referrers_are_skipped(registry_plain: RegistryServer) -> None:
    """An SBOM referrer, a two-layer referrer, and one whose subject is another image are not bundles."""
    ref = _ref(registry_plain)
    repo = Repository.of(ref)
    with registry_plain.client() as client:
        empty = client.push_blob(repo, b"{}")
        blob = client.push_blob(repo, b"payload")
        entries = []
        for artifact_type, layers, subject in [
            ("application/spdx+json", 1, VALID_DIGEST),
            (BUNDLE_V03, 2, VALID_DIGEST),
            (BUNDLE_V03, 1, Digest.of(b"another image")),
        ]:
            doc = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2, "digest": str(empty)},
                "layers": [{"mediaType": BUNDLE_V03, "size": 7, "digest": str(blob)}] * layers,
                "subject": {"mediaType": OCI_MANIFEST, "size": 1, "digest": str(subject)},
            }
            raw = go_json(doc)
            digest = client.push_manifest(repo, Digest.of(raw), raw, OCI_MANIFEST)
            entries.append(Descriptor(OCI_MANIFEST, digest, len(raw), artifact_type=artifact_type).to_json())
        index = go_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
        client.push_manifest(repo, referrers_tag(VALID_DIGEST), index, OCI_INDEX)
        before = client.request_count
        assert fetch_bundles(client, repo, VALID_DIGEST) == ()
        assert client.request_count - before == 2 + 2, "the SBOM is skipped by its artifactType alone"


def test_bundle_subject_defaults_to_the_image_in_the_registry(registry_plain: RegistryServer) -> None:
    ref = _ref(registry_plain)
    with registry_plain.client() as client:
        image = push_tiny_image(client, Repository.of(ref), "latest")
        attach_bundle(client, ref, image.digest, _bundle(3))
        referrer_index = client.get_manifest(Repository.of(ref), referrers_tag(image.digest))
        (entry,) = referrer_index.manifests()
        referrer = client.get_manifest(Repository.of(ref), entry.digest)
        with pytest.raises(RegistryError, match="image manifest not found"):
            attach_bundle(client, ref, Digest.of(b"absent"), _bundle(4))
    assert referrer.parsed["subject"] == {
        "mediaType": OCI_MANIFEST,
        "size": len(image.raw),
        "digest": str(image.digest),
    }


def test_legacy_first_keeps_the_common_case_at_two_requests(registry_plain: RegistryServer) -> None:
    """Both layouts present: with a satisfied ``enough`` the referrers are never asked for."""
    ref = _ref(registry_plain)
    sig = load_dir_signature(CASES / "dir-img-cosign-valid/signature-1")
    subject = Descriptor(OCI_MANIFEST, VALID_DIGEST, 428)
    with registry_plain.client() as client:
        attach_signature(client, ref, VALID_DIGEST, sig)
        bundle = _bundle(5)
        attach_bundle(client, ref, VALID_DIGEST, bundle, subject=subject)
        target = ref.with_digest(VALID_DIGEST)

        count = client.request_count
        assert client.resolve(target) == VALID_DIGEST
        quick = fetch_signatures(client, target, VALID_DIGEST, enough=lambda s: len(s.signatures) > 0)
        assert client.request_count - count == 2
        assert [type(s) for s in quick.signatures] == [LegacySignature]

        count = client.request_count
        both = fetch_signatures(client, target, VALID_DIGEST)
        assert client.request_count - count == 2 + 4
        assert [type(s) for s in both.signatures] == [LegacySignature, BundleSignature]

        # cosign v3's order: bundles first
        count = client.request_count
        v3 = fetch_signatures(client, target, VALID_DIGEST, order=("bundle",), enough=lambda s: True)
        assert client.request_count - count == 4
        assert [s.bundle for s in v3.signatures if isinstance(s, BundleSignature)] == [bundle]


def test_signature_tag_holding_an_index_is_refused(registry_plain: RegistryServer) -> None:
    ref = _ref(registry_plain)
    repo = Repository.of(ref)
    with registry_plain.client() as client:
        image = push_tiny_image(client, repo, None)
        index = go_json(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [image.descriptor().to_json()]}
        )
        client.push_manifest(repo, signature_tag(VALID_DIGEST), index, OCI_INDEX)
        sig = load_dir_signature(CASES / "dir-img-cosign-valid/signature-1")
        with pytest.raises(RegistryError):
            fetch_legacy(client, repo, VALID_DIGEST)
        with pytest.raises(RegistryError):
            attach_signature(client, ref, VALID_DIGEST, sig)


def test_client_without_insecure_flag_cannot_read_signatures(registry_plain: RegistryServer) -> None:
    with RegistryClient(timeout=2, deadline=4) as client, pytest.raises(RegistryError):
        fetch_signatures(client, _ref(registry_plain), VALID_DIGEST)
