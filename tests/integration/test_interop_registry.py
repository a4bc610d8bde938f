"""The shared cosign interop vectors (tests/vectors/cosign, "Expected verdicts", cosign column) through a
real docker-registry: each case's signature artifact is pushed in cosign's layout (one OCI manifest tagged
``sha256-<hex>.sig``, one layer per ``signature-N``: payload blob, mediaType and annotations verbatim) and
``imageguard verify REG/repo@sha256:<sha256 of manifest.json> --key ...`` must give the expected verdict.

The image manifests themselves are not pushed (their blobs are not shipped; Decision 8 of the formats
document), so verification by digest reference must not need them. With ``--require-tlog`` every case is
rejected: none carries a Rekor entry, and cosign rejects them all when the log is required.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.registry import OCI_MANIFEST, Descriptor, Repository
from agent.adapters.signatures import OCI_CONFIG, signature_config, signature_manifest, signature_tag
from agent.core.digest import Digest
from agent.verify.cosign.artifacts import ANN_SIGNATURE, LegacySignature
from tests.support.agentproc import cli
from tests.support.cosign import CASES, KEYS, load_case, read_dir_signature
from tests.support.fixtures.registry import RegistryServer
from tests.support.signing import registry_entry, write_agent_config

pytestmark = pytest.mark.integration

VALID = Digest("sha256:634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00")


def case(name: str) -> Callable[[], tuple[Digest, list[LegacySignature]]]:
    def load() -> tuple[Digest, list[LegacySignature]]:
        digest, sigs = load_case(name)
        assert digest is not None, name
        return digest, sigs

    return load


def _valid_layer(
    annotation: str | None = None, payload: bytes | None = None, drop: bool = False
) -> LegacySignature:
    (good,) = load_case("dir-img-cosign-valid")[1]
    annotations = dict(good.annotations)
    if drop:
        del annotations[ANN_SIGNATURE]
    elif annotation is not None:
        annotations[ANN_SIGNATURE] = annotation
    return LegacySignature(good.media_type, payload if payload is not None else good.payload, annotations, "")


def layers(*make: Callable[[], LegacySignature]) -> Callable[[], tuple[Digest, list[LegacySignature]]]:
    return lambda: (VALID, [m() for m in make])


GOOD_SIG = _valid_layer().annotations[ANN_SIGNATURE]
INLINE_AMP = (
    "MEUCIARnnxZQPALBfqkB4aNAYXad79Qs6VehcrgIeZ8p7I2FAiEAzq2HXwXlz1iJeh+ucUR3L0zpjynQk6Rk0+/gXYp49RU="
)
INLINE_EMPTY = (
    "MEUCIQDkySOBGxastVP0+koTA33NH5hXjwosFau4rxTPN6g48QIgb7eWKkGqfEpHMM3aT4xiqyP/170jEkdFuciuwN4mux4="
)


@dataclass(frozen=True)
class Row:
    id: str
    artifact: Callable[[], tuple[Digest, list[LegacySignature]]]
    keys: tuple[str, ...]
    valid: bool
    code: str = ""  # the reason code every signature's rejection must name, when invalid
    repository: str = ""  # default: interop/<id>
    verified_layer: int = 0
    extra: tuple[str, ...] = ()
    by_tag: bool = False  # verify REG/repo:latest instead of the digest (no manifest is pushed)


ROWS = [
    Row("valid", case("dir-img-cosign-valid"), ("cosign.pub",), True),
    Row("valid-both-keys", case("dir-img-cosign-valid"), ("cosign.pub", "cosign2.pub"), True),
    Row("valid-both-keys-reversed", case("dir-img-cosign-valid"), ("cosign2.pub", "cosign.pub"), True),
    Row("valid-cosign2-only", case("dir-img-cosign-valid"), ("cosign2.pub",), False, "signature-mismatch"),
    # cosign ignores the docker-reference: any repository verifies
    Row(
        "valid-other-reference",
        case("dir-img-cosign-valid"),
        ("cosign.pub",),
        True,
        repository="testing/manifest",
    ),
    # ... unless the anchor asks for containers/image's matchRepository (c/image column)
    Row(
        "valid-strict-identity",
        case("dir-img-cosign-valid"),
        ("cosign.pub",),
        False,
        "identity-mismatch",
        repository="strict/testing/manifest",
        extra=("--strict-identity",),
    ),
    Row("valid-2", case("dir-img-cosign-valid-2"), ("cosign.pub",), True),
    Row(
        "valid-2-other-reference",
        case("dir-img-cosign-valid-2"),
        ("cosign.pub",),
        True,
        repository="this/does-not",
    ),
    Row(
        "valid-with-tag",
        case("dir-img-cosign-valid-with-tag"),
        ("cosign.pub",),
        True,
        repository="skopeo-signed",
    ),
    Row(
        "modified-manifest",
        case("dir-img-cosign-modified-manifest"),
        ("cosign.pub",),
        False,
        "digest-mismatch",
    ),
    Row(
        "manifest-digest-error",
        case("dir-img-cosign-manifest-digest-error"),
        ("cosign.pub",),
        False,
        "digest-mismatch",
    ),
    # no image manifest: the signature sits under the signed digest's tag, but there is no image to resolve
    Row(
        "no-manifest",
        lambda: (VALID, [read_dir_signature(CASES / "dir-img-cosign-no-manifest" / "signature-1")]),
        ("cosign.pub",),
        False,
        "not found",
        by_tag=True,
    ),
    Row("mixed", case("dir-img-cosign-mixed"), ("cosign.pub",), True, verified_layer=1),
    Row(
        "other-attachment",
        case("dir-img-cosign-other-attachment"),
        ("cosign.pub",),
        False,
        "signature-mismatch",
    ),
    Row(
        "unknown-key-cosign",
        layers(lambda: read_dir_signature(CASES / "unknown-cosign-key.signature")),
        ("cosign.pub",),
        False,
        "signature-mismatch",
    ),
    Row(
        "unknown-key-cosign2",
        layers(lambda: read_dir_signature(CASES / "unknown-cosign-key.signature")),
        ("cosign2.pub",),
        False,
        "signature-mismatch",
    ),
    Row(
        "invalid-signature-bytes",
        layers(lambda: _valid_layer(base64.b64encode(b"invalid signature").decode())),
        ("cosign.pub",),
        False,
        "signature-mismatch",
    ),
    Row(
        "annotation-removed",
        layers(lambda: _valid_layer(drop=True)),
        ("cosign.pub",),
        False,
        "malformed-signature",
    ),
    Row("base64-ampersand", layers(lambda: _valid_layer("&")), ("cosign.pub",), False, "malformed-signature"),
    Row(
        "base64-extra-padding",
        layers(lambda: _valid_layer(GOOD_SIG + "=")),
        ("cosign.pub",),
        False,
        "malformed-signature",
    ),
    Row(
        "base64-truncated",
        layers(lambda: _valid_layer(GOOD_SIG[:-1])),
        ("cosign.pub",),
        False,
        "malformed-signature",
    ),
    Row(
        "inline-ampersand-payload",
        layers(lambda: _valid_layer(INLINE_AMP, payload=b"&")),
        ("cosign.pub",),
        False,
        "payload-invalid",
    ),
    Row(
        "inline-empty-object-payload",
        layers(lambda: _valid_layer(INLINE_EMPTY, payload=b"{}")),
        ("cosign.pub",),
        False,
        "payload-invalid",
    ),
]


def push_signature_layers(
    server: RegistryServer, repo: Repository, digest: Digest, sigs: list[LegacySignature]
) -> None:
    """cosign's layout: payload blobs, a minimal config, one OCI manifest tagged ``sha256-<hex>.sig``."""
    with server.client() as client:
        descriptors = []
        for sig in sigs:
            client.push_blob(repo, sig.payload)
            descriptors.append(
                Descriptor(sig.media_type, Digest.of(sig.payload), len(sig.payload), dict(sig.annotations))
            )
        config = signature_config(descriptors)
        client.push_blob(repo, config)
        raw = signature_manifest(Descriptor(OCI_CONFIG, Digest.of(config), len(config)), descriptors)
        client.push_raw_manifest(repo, signature_tag(digest), raw, OCI_MANIFEST)
        # what the registry serves under the tag is what cosign would read
        served = client.get_manifest(repo, signature_tag(digest))
        assert served.raw == raw and [d.annotations for d in served.layers()] == [s.annotations for s in sigs]


@dataclass
class Result:
    image: str
    digest: Digest
    exit_code: int
    doc: dict[str, Any]
    tlog_exit_code: int
    tlog_doc: dict[str, Any]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, registry_plain: RegistryServer) -> dict[str, Result]:
    """Push every row, then run ``imageguard verify`` for all of them (with and without --require-tlog)."""
    d = tmp_path_factory.mktemp("interop")
    config = write_agent_config(
        d / "config.toml",
        {"device": {"id": "interop"}, "state": {"dir": str(d / "state")}},
        [registry_entry(registry_plain)],
    )
    jobs = []
    for row in ROWS:
        digest, sigs = row.artifact()
        repo = Repository(registry_plain.host, f"interop/{row.repository or row.id}")
        push_signature_layers(registry_plain, repo, digest, sigs)
        image = f"{repo}:latest" if row.by_tag else f"{repo}@{digest}"
        args = [a for k in row.keys for a in ("--key", str(KEYS / k))] + list(row.extra)
        jobs.append((row, image, digest, args))

    def run(image: str, args: list[str]) -> tuple[int, dict[str, Any]]:
        out = cli(config, "verify", image, *args, "--json")
        assert out.returncode in (0, 1), f"{image}: exit {out.returncode}: {out.stderr}"
        return out.returncode, json.loads(out.stdout)

    with ThreadPoolExecutor(8) as pool:
        plain = [pool.submit(run, image, args) for _, image, _, args in jobs]
        tlog = [pool.submit(run, image, [*args, "--require-tlog"]) for _, image, _, args in jobs]
        return {
            row.id: Result(image, digest, *p.result(), *t.result())
            for (row, image, digest, _), p, t in zip(jobs, plain, tlog, strict=True)
        }


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_expected_verdict_through_the_registry(results: dict[str, Result], row: Row) -> None:
    r = results[row.id]
    doc = r.doc
    assert r.exit_code == (0 if row.valid else 1), doc
    assert doc["valid"] is row.valid
    if row.valid:
        assert doc["digest"] == str(r.digest) == str(VALID)
        assert doc["anchor"] == "key-cosign.pub"  # whatever the order of --key, the key that signed
        assert doc["signature"]["origin"].endswith(f".sig layer {row.verified_layer}"), doc["signature"]
        assert doc["signature"]["tlog_verified"] is False
    else:
        assert doc["reason"] == "signature-invalid"
        assert doc["reasons"] and all(row.code in reason for reason in doc["reasons"]), doc["reasons"]
        if not row.by_tag:
            # one reason per signature and anchor: nothing was skipped
            assert len(doc["reasons"]) == len(row.keys) * len(row.artifact()[1])


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_tlog_required_rejects_every_case(results: dict[str, Result], row: Row) -> None:
    r = results[row.id]
    assert r.tlog_exit_code == 1, r.tlog_doc
    assert r.tlog_doc["valid"] is False
    if row.valid:
        # what verified before now fails for the missing log entry only
        assert any("tlog-required" in reason for reason in r.tlog_doc["reasons"]), r.tlog_doc["reasons"]


def test_fixture_files_are_the_documented_ones() -> None:
    """Guard against a changed copy: the digests the table relies on."""
    assert Digest.of((CASES / "dir-img-cosign-valid" / "manifest.json").read_bytes()) == VALID
    assert not (CASES / "dir-img-cosign-no-manifest" / "manifest.json").exists()
    assert Path(KEYS / "cosign.pub").read_bytes() != Path(KEYS / "cosign2.pub").read_bytes()
