"""Pure parts of the registry adapter: registry JSON -> typed records, Go-compatible JSON, challenges."""

from __future__ import annotations

import json

import pytest

from agent.adapters.registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    _parse_challenge,
    go_json,
    parse_manifest,
)
from agent.adapters.signatures import referrers_tag, signature_config, signature_manifest, signature_tag
from agent.core.digest import Digest
from agent.errors import RegistryError

D = Digest.of(b"x")
DESC = {"mediaType": "application/octet-stream", "size": 1, "digest": str(D)}


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        (OCI_MANIFEST, {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}, OCI_MANIFEST),
        (OCI_MANIFEST, {"schemaVersion": 2, "layers": []}, OCI_MANIFEST),
        (OCI_INDEX, {"schemaVersion": 2, "manifests": []}, OCI_INDEX),
        (DOCKER_MANIFEST, {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST}, DOCKER_MANIFEST),
        (None, {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST}, DOCKER_MANIFEST_LIST),
        ("application/json", {"schemaVersion": 2, "mediaType": OCI_INDEX}, OCI_INDEX),
    ],
)
def test_parse_manifest_accepts(content_type: str | None, body: dict[str, object], expected: str) -> None:
    raw = json.dumps(body).encode()
    manifest = parse_manifest(raw, content_type, "m")
    assert manifest.media_type == expected
    assert manifest.digest == Digest.of(raw)
    assert manifest.is_index is (expected in (OCI_INDEX, DOCKER_MANIFEST_LIST))


@pytest.mark.parametrize(
    ("content_type", "raw", "words"),
    [
        (OCI_MANIFEST, b"\xff\xfe", "not JSON"),
        (OCI_MANIFEST, b"{", "not JSON"),
        (OCI_MANIFEST, b"1", "not a JSON object"),
        ("text/html", b"{}", "unexpected manifest media type 'text/html'"),
        (None, b"{}", "unexpected manifest media type None"),
        (OCI_MANIFEST, json.dumps({"mediaType": OCI_INDEX}).encode(), "the document says"),
        (OCI_MANIFEST, b'{"schemaVersion":1}', "schema 1"),
        ("application/vnd.docker.distribution.manifest.v1+prettyjws", b"{}", "schema 1"),
    ],
)
def test_parse_manifest_rejects(content_type: str | None, raw: bytes, words: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_manifest(raw, content_type, "thing")
    assert words in str(info.value)
    assert str(info.value).startswith("thing: ")


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        ([], "not a JSON object"),
        ({**DESC, "mediaType": ""}, "no mediaType"),
        ({**DESC, "size": -1}, "size"),
        ({**DESC, "size": True}, "size"),
        ({**DESC, "size": "1"}, "size"),
        ({**DESC, "digest": "sha256:abc"}, "digest"),
        ({**DESC, "digest": 5}, "digest"),
        ({**DESC, "digest": "sha512:" + "0" * 128}, "digest"),
        ({**DESC, "annotations": {"a": 1}}, "annotations"),
        ({**DESC, "annotations": []}, "annotations"),
        ({**DESC, "artifactType": 3}, "artifactType"),
    ],
)
def test_descriptor_rejects(obj: object, words: str) -> None:
    with pytest.raises(RegistryError, match=words):
        Descriptor.from_json(obj, "d")


def test_descriptor_round_trip_in_go_field_order() -> None:
    desc = Descriptor.from_json({**DESC, "annotations": {"b": "2", "a": "1"}, "artifactType": "t"}, "d")
    assert list(desc.to_json()) == ["mediaType", "size", "digest", "annotations", "artifactType"]
    assert list(desc.to_json()["annotations"]) == ["a", "b"], "Go sorts map keys"
    assert Descriptor.from_json(desc.to_json(), "d") == desc


def test_manifest_descriptor_lists_are_bounded() -> None:
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [DESC] * 3}).encode()
    manifest = parse_manifest(raw, OCI_MANIFEST, "m")
    assert len(manifest.layers()) == 3
    with pytest.raises(RegistryError, match="more than the limit of 2"):
        manifest.layers(limit=2)
    bad = parse_manifest(json.dumps({"schemaVersion": 2, "layers": {}}).encode(), OCI_MANIFEST, "m")
    with pytest.raises(RegistryError, match="not a list"):
        bad.layers()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"a": "<&>"}, b'{"a":"\\u003c\\u0026\\u003e"}'),
        ({"a": "é\u2028"}, '{"a":"é\\u2028"}'.encode()),
        ({"b": 1, "a": [True, None]}, b'{"b":1,"a":[true,null]}'),
    ],
)
def test_go_json(value: object, expected: bytes) -> None:
    assert go_json(value) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('Basic realm="registry"', ("basic", {"realm": "registry"})),
        (
            'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull"',
            (
                "bearer",
                {
                    "realm": "https://auth.example/token",
                    "service": "registry.example",
                    "scope": "repository:a/b:pull",
                },
            ),
        ),
        ("bearer realm=https://x/t, service=s", ("bearer", {"realm": "https://x/t", "service": "s"})),
    ],
)
def test_parse_challenge(header: str, expected: tuple[str, dict[str, str]]) -> None:
    assert _parse_challenge(header, "w") == expected


@pytest.mark.parametrize("header", ["", "Negotiate", "Digest realm=x"])
def test_parse_challenge_rejects(header: str) -> None:
    with pytest.raises(RegistryError) as info:
        _parse_challenge(header, "w")
    assert info.value.code == "registry-auth-failed"


def test_cosign_tags() -> None:
    assert signature_tag(D) == f"sha256-{D.hex}.sig"
    assert referrers_tag(D) == f"sha256-{D.hex}"


def test_signature_config_and_manifest_shape() -> None:
    layers = [Descriptor("application/vnd.dev.cosign.simplesigning.v1+json", D, 1, {"k": "v"})]
    config = signature_config(layers)
    assert json.loads(config)["rootfs"]["diff_ids"] == [str(D)]
    raw = signature_manifest(
        Descriptor("application/vnd.oci.image.config.v1+json", Digest.of(config), len(config)), layers
    )
    doc = json.loads(raw)
    assert list(doc) == ["schemaVersion", "mediaType", "config", "layers"]
    assert doc["layers"] == [
        {"mediaType": layers[0].media_type, "size": 1, "digest": str(D), "annotations": {"k": "v"}}
    ]
