"""Garbage signature material never raises anything but VerificationError (and never verifies)."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core.digest import Digest
from agent.errors import VerificationError
from agent.verify.cosign.artifacts import (
    ANN_BUNDLE,
    ANN_CERTIFICATE,
    ANN_CHAIN,
    ANN_SIGNATURE,
    BundleSignature,
    LegacySignature,
)
from agent.verify.cosign.verify import verify_image
from tests.support.cosign import REKOR_FOR_FUZZ, Pki, dsse_bundle, key_anchor, now_ts, pub, statement

EXAMPLES = int(os.environ.get("IMAGEGUARD_FUZZ_EXAMPLES", "150"))  # raise for a deeper local run
DIGEST = Digest.of(b"fuzzed image")
PKI = Pki()
ANCHORS = [
    key_anchor(pub("cosign.pub"), rekor_public_key=REKOR_FOR_FUZZ.pem),
    PKI.anchor(rekor_public_key=REKOR_FOR_FUZZ.pem),
]
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
annotation_text = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=150).map(lambda b: base64.b64encode(b).decode()),
    json_values.map(json.dumps),
    st.just("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
)


def _must_fail(sigs: list[Any]) -> None:
    for anchor in ANCHORS:
        try:
            verify_image(DIGEST, sigs, anchor, now=now_ts())
        except VerificationError:
            continue
        raise AssertionError("garbage verified")


@SETTINGS
@given(
    payload=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
    annotations=st.dictionaries(
        st.sampled_from([ANN_SIGNATURE, ANN_CERTIFICATE, ANN_CHAIN, ANN_BUNDLE]), annotation_text
    ),
    media_type=st.text(max_size=40),
)
def test_garbage_legacy_layers(payload: bytes, annotations: dict[str, str], media_type: str) -> None:
    _must_fail([LegacySignature(media_type, payload, annotations, "fuzz")])


@SETTINGS
@given(data=st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v).encode()))
def test_garbage_bundles(data: bytes) -> None:
    _must_fail([BundleSignature("application/vnd.dev.sigstore.bundle.v0.3+json", data, "fuzz")])


VALID_BUNDLE = json.loads(
    dsse_bundle(
        PKI.leaf_key, statement(Digest.of(b"other")), certificates=[PKI.leaf()], rekor=REKOR_FOR_FUZZ
    ).bundle
)


def _legacy_with_rekor() -> LegacySignature:
    from agent.verify.cosign import keys
    from agent.verify.cosign.payload import build_payload
    from tests.support.cosign import legacy, pem

    payload = build_payload("r.example/app", Digest.of(b"other"))
    signature = keys.sign(payload, PKI.leaf_key)
    leaf = PKI.leaf()
    from cryptography.hazmat.primitives.serialization import Encoding

    ann = REKOR_FOR_FUZZ.legacy_bundle(
        signature=signature,
        payload=payload,
        signer_pem=leaf.public_bytes(Encoding.PEM),
        integrated_time=1_750_000_000,
    )
    return legacy(
        payload, signature, **{ANN_CERTIFICATE: pem(leaf), ANN_CHAIN: pem(PKI.inter), ANN_BUNDLE: ann}
    )


VALID_LEGACY = _legacy_with_rekor()
REKOR_ANNOTATION = json.loads(VALID_LEGACY.annotations[ANN_BUNDLE])


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


PATHS = [p for p in _paths(VALID_BUNDLE) if p]


@SETTINGS
@given(path=st.sampled_from(PATHS), value=json_values)
def test_mutated_bundles(path: tuple[Any, ...], value: Any) -> None:
    doc = json.loads(json.dumps(VALID_BUNDLE))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    # signed for another digest, so even a harmless mutation must not verify
    _must_fail(
        [BundleSignature("application/vnd.dev.sigstore.bundle.v0.3+json", json.dumps(doc).encode(), "fuzz")]
    )


@SETTINGS
@given(path=st.sampled_from([p for p in _paths(REKOR_ANNOTATION) if p]), value=json_values)
def test_mutated_rekor_annotations(path: tuple[Any, ...], value: Any) -> None:
    doc = json.loads(json.dumps(REKOR_ANNOTATION))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    annotations = {**VALID_LEGACY.annotations, ANN_BUNDLE: json.dumps(doc)}
    _must_fail([LegacySignature(VALID_LEGACY.media_type, VALID_LEGACY.payload, annotations, "fuzz")])
