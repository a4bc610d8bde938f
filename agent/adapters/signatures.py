"""Where cosign keeps signatures in a registry: discovery (read) and attachment (write).

Two layouts, both in the image's own repository:
- legacy: tag ``sha256-<hex>.sig``, an OCI manifest whose every layer is one signature (payload blob +
  descriptor annotations);
- cosign v3: Sigstore bundles as OCI 1.1 referrers of the image digest, found through
  ``/v2/<name>/referrers/<digest>`` or, on registries without that API, the fallback index at tag
  ``sha256-<hex>``.

Cost of discovery (HTTP requests, anonymous registry, digest reference): legacy = 1 + one per signature
(2 for the common single signature); bundles = 1 (referrers API) or 2 (API missing: its 404 + the
fallback tag), then 2 per bundle (manifest + blob). :func:`fetch_signatures` reads legacy first and stops
there when the caller's ``enough`` callback is satisfied, so a verified ``.sig`` signature costs 2 requests.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from agent.adapters.registry import (
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    RegistryClient,
    Repository,
    go_json,
)
from agent.core.digest import Digest
from agent.core.imageref import ImageRef
from agent.errors import RegistryError
from agent.verify.cosign.artifacts import (
    BUNDLE_MEDIA_TYPE_PREFIX,
    BundleSignature,
    LegacySignature,
    SignatureArtifact,
    SignatureSet,
)

Source = Literal["legacy", "bundle"]

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
BUNDLE_V03 = "application/vnd.dev.sigstore.bundle.v0.3+json"
COSIGN_SIGN_PREDICATE = "https://sigstore.dev/cosign/sign/v1"
#: a signature manifest or referrer list longer than this is refused, bounding requests per verification
MAX_SIGNATURES = 64
_ZERO_TIME = "0001-01-01T00:00:00Z"
# indexes are accepted only to be refused: a registry asked for manifests alone may instead serve an
# index's platform child under the tag (docker-registry 2.8 does), which would hide what the tag holds
_ANY_MANIFEST = MANIFEST_MEDIA_TYPES


def signature_tag(digest: Digest) -> str:
    """cosign's legacy tag for the signatures of ``digest``."""
    return f"sha256-{digest.hex}.sig"


def referrers_tag(digest: Digest) -> str:
    """The OCI referrers tag schema's fallback index tag for ``digest``."""
    return f"sha256-{digest.hex}"


# ---- discovery ------------------------------------------------------------------------------------


def fetch_legacy(client: RegistryClient, repo: Repository, digest: Digest) -> tuple[LegacySignature, ...]:
    """Every layer of the ``.sig`` manifest, payload fetched and digest-checked; none if there is no tag."""
    tag = signature_tag(digest)
    manifest = client.find_manifest(repo, tag, accept=_ANY_MANIFEST)
    if manifest is None:
        return ()
    if manifest.is_index:
        raise RegistryError(f"{repo}:{tag}: a signature tag must name an image manifest, not an index")
    out = []
    for i, layer in enumerate(manifest.layers(MAX_SIGNATURES)):
        payload = client.get_descriptor_blob(repo, layer)
        out.append(
            LegacySignature(layer.media_type, payload, dict(layer.annotations), f"{repo}:{tag} layer {i}")
        )
    return tuple(out)


def fetch_bundles(client: RegistryClient, repo: Repository, digest: Digest) -> tuple[BundleSignature, ...]:
    """Sigstore bundles among the referrers of ``digest`` (cosign's filter: one layer of a bundle type)."""
    descriptors = client.referrers(repo, digest)
    if descriptors is None:
        index = client.find_manifest(repo, referrers_tag(digest), accept=(OCI_INDEX,))
        if index is None:
            return ()
        if not index.is_index:
            raise RegistryError(f"{repo}:{referrers_tag(digest)}: the referrers tag does not name an index")
        descriptors = index.manifests(MAX_SIGNATURES)
    if len(descriptors) > MAX_SIGNATURES:
        raise RegistryError(
            f"{repo}: {digest} has {len(descriptors)} referrers, over the limit of {MAX_SIGNATURES}"
        )
    out = []
    for desc in descriptors:
        # the index already says what each referrer is: skip attestations, SBOMs, notation signatures
        if desc.artifact_type and not desc.artifact_type.startswith(BUNDLE_MEDIA_TYPE_PREFIX):
            continue
        if desc.media_type != OCI_MANIFEST:
            continue
        manifest = client.find_manifest(repo, desc.digest, accept=(OCI_MANIFEST,))
        if manifest is None:  # a stale fallback index entry
            continue
        layer = _bundle_layer(manifest, digest)
        if layer is not None:
            bundle = client.get_descriptor_blob(repo, layer)
            out.append(BundleSignature(layer.media_type, bundle, f"{repo}@{manifest.digest}"))
    return tuple(out)


def _bundle_layer(manifest: Manifest, digest: Digest) -> Descriptor | None:
    layers = manifest.layers(MAX_SIGNATURES)
    if len(layers) != 1 or not layers[0].media_type.startswith(BUNDLE_MEDIA_TYPE_PREFIX):
        return None
    subject = manifest.parsed.get("subject")
    if (
        subject is not None
        and Descriptor.from_json(subject, f"referrer {manifest.digest} subject").digest != digest
    ):
        return None  # not a referrer of this image (a fallback index is just a tag anyone can write)
    return layers[0]


_FETCHERS: dict[str, Callable[[RegistryClient, Repository, Digest], Sequence[SignatureArtifact]]] = {
    "legacy": fetch_legacy,
    "bundle": fetch_bundles,
}


def fetch_signatures(
    client: RegistryClient,
    ref: ImageRef,
    digest: Digest,
    *,
    order: Sequence[Source] = ("legacy", "bundle"),
    enough: Callable[[SignatureSet], bool] | None = None,
    repository: Repository | None = None,
) -> SignatureSet:
    """Signatures of ``digest`` from each source in ``order``.

    ``enough`` is asked after each source with what was found so far (typically "did one verify?"); a
    True answer skips the remaining sources. A source that fails raises its error unless ``enough`` was
    already satisfied by an earlier one, so an unreadable source never looks like "no signatures".
    ``repository`` moves the lookup elsewhere (cosign's ``COSIGN_REPOSITORY``).
    """
    repo = repository or Repository.of(ref)
    found: list[SignatureArtifact] = []
    for source in order:
        fetcher = _FETCHERS.get(source)
        if fetcher is None:
            raise ValueError(f"unknown signature source {source!r}")
        found.extend(fetcher(client, repo, digest))
        result = SignatureSet(digest, tuple(found), str(repo))
        if enough is not None and enough(result):
            return result
    return SignatureSet(digest, tuple(found), str(repo))


# ---- writing --------------------------------------------------------------------------------------


def signature_config(layers: Sequence[Descriptor]) -> bytes:
    """The minimal image config cosign (go-containerregistry) writes for a ``.sig`` manifest."""
    return go_json(
        {
            "architecture": "",
            "created": _ZERO_TIME,
            "history": [{"created": _ZERO_TIME} for _ in layers],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": [d.digest.value for d in layers]},
            "config": {},
        }
    )


def signature_manifest(config: Descriptor, layers: Sequence[Descriptor]) -> bytes:
    return go_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.to_json(),
            "layers": [d.to_json() for d in layers],
        }
    )


def attach_signature(
    client: RegistryClient, ref: ImageRef, digest: Digest, signature: LegacySignature
) -> Digest:
    """Add one signature layer to ``sha256-<hex>.sig`` (read-modify-write, like cosign; racy like cosign).

    Attaching a signature that is already there (same payload, media type and annotations) changes
    nothing. Returns the digest of the signature manifest.
    """
    repo = Repository.of(ref)
    tag = signature_tag(digest)
    existing = client.find_manifest(repo, tag, accept=_ANY_MANIFEST)
    if existing is not None and existing.is_index:
        raise RegistryError(
            f"{repo}:{tag}: holds an index, not a signature manifest; refusing to overwrite it"
        )
    layers = list(existing.layers(MAX_SIGNATURES)) if existing is not None else []
    new = Descriptor(
        signature.media_type,
        Digest.of(signature.payload),
        len(signature.payload),
        dict(signature.annotations),
    )
    if existing is not None and new in layers:
        return existing.digest
    if len(layers) >= MAX_SIGNATURES:
        raise RegistryError(f"{repo}:{tag}: already holds {len(layers)} signatures, the most we read")
    client.push_blob(repo, signature.payload)
    layers.append(new)
    config = signature_config(layers)
    client.push_blob(repo, config)
    raw = signature_manifest(Descriptor(OCI_CONFIG, Digest.of(config), len(config)), layers)
    return client.push_manifest(repo, tag, raw, OCI_MANIFEST)


def attach_bundle(
    client: RegistryClient,
    ref: ImageRef,
    digest: Digest,
    bundle: bytes,
    *,
    media_type: str = BUNDLE_V03,
    subject: Descriptor | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Digest:
    """Store a Sigstore bundle as an OCI referrer of ``digest``, the way cosign v3 does.

    ``subject`` defaults to a HEAD of the image manifest (it must then exist in the registry). When the
    registry does not index referrers itself (no ``OCI-Subject`` in the PUT answer), the fallback index
    at tag ``sha256-<hex>`` is updated (read, add, sort by digest, write). Returns the referrer's digest.
    """
    repo = Repository.of(ref)
    if subject is None:
        subject = client.head_manifest(repo, digest)
        if subject is None:
            raise RegistryError(f"{repo}@{digest}: image manifest not found; cannot attach a bundle to it")
    if subject.digest != digest:
        raise RegistryError(f"{repo}: subject descriptor {subject.digest} is not the image {digest}")
    if annotations is None:
        created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        annotations = {
            "dev.sigstore.bundle.content": "dsse-envelope",
            "dev.sigstore.bundle.predicateType": COSIGN_SIGN_PREDICATE,
            "org.opencontainers.image.created": created,
        }
    client.push_blob(repo, EMPTY_JSON)
    client.push_blob(repo, bundle)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": media_type,
        "config": Descriptor(OCI_EMPTY, Digest.of(EMPTY_JSON), len(EMPTY_JSON)).to_json(),
        "layers": [Descriptor(media_type, Digest.of(bundle), len(bundle)).to_json()],
        "subject": Descriptor(subject.media_type, subject.digest, subject.size).to_json(),
    }
    if annotations:
        doc["annotations"] = dict(sorted(annotations.items()))
    raw = go_json(doc)
    referrer = client.push_manifest(repo, Digest.of(raw), raw, OCI_MANIFEST)
    if not client.last_push_indexed_subject:
        entry = Descriptor(OCI_MANIFEST, referrer, len(raw), dict(annotations), media_type)
        _add_to_fallback_index(client, repo, digest, entry)
    return referrer


def _add_to_fallback_index(
    client: RegistryClient, repo: Repository, digest: Digest, entry: Descriptor
) -> None:
    tag = referrers_tag(digest)
    existing = client.find_manifest(repo, tag, accept=(OCI_INDEX,))
    if existing is not None and not existing.is_index:
        raise RegistryError(
            f"{repo}:{tag}: is not an index; refusing to overwrite it with the referrers index"
        )
    entries = {d.digest: d for d in (existing.manifests(MAX_SIGNATURES) if existing else ())}
    if entry.digest in entries:
        return
    entries[entry.digest] = entry
    raw = go_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [entries[d].to_json() for d in sorted(entries)],
        }
    )
    client.push_manifest(repo, tag, raw, OCI_INDEX)
