"""What the registry side hands to the verifier: signature material as bytes, never sockets or paths."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.core.digest import Digest

SIMPLE_SIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
BUNDLE_MEDIA_TYPE_PREFIX = "application/vnd.dev.sigstore.bundle"

ANN_SIGNATURE = "dev.cosignproject.cosign/signature"
ANN_CERTIFICATE = "dev.sigstore.cosign/certificate"
ANN_CHAIN = "dev.sigstore.cosign/chain"
ANN_BUNDLE = "dev.sigstore.cosign/bundle"
ANN_RFC3161 = "dev.sigstore.cosign/rfc3161timestamp"


@dataclass(frozen=True)
class LegacySignature:
    """One layer of a cosign ``sha256-<hex>.sig`` manifest: the payload blob and the layer's annotations."""

    media_type: str
    payload: bytes
    annotations: Mapping[str, str] = field(default_factory=dict)
    #: where it came from, for reports (e.g. "registry:5000/app:sha256-....sig layer 0")
    origin: str = ""


@dataclass(frozen=True)
class BundleSignature:
    """A Sigstore bundle (v0.1-v0.3 JSON bytes) found as an OCI referrer of the image."""

    media_type: str
    bundle: bytes
    origin: str = ""


SignatureArtifact = LegacySignature | BundleSignature


@dataclass(frozen=True)
class SignatureSet:
    """Every signature found for one image digest."""

    digest: Digest
    signatures: tuple[SignatureArtifact, ...]
    #: repository the image (and its signatures) live in, ``registry/repository``
    repository: str = ""
