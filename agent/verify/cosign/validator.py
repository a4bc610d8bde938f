"""The cosign scheme behind the validator interface of :mod:`agent.verify.schemes`."""

from __future__ import annotations

from collections.abc import Sequence

from agent.core.anchors import TrustAnchor
from agent.core.digest import Digest
from agent.errors import PolicyError
from agent.verify.cosign.artifacts import SignatureArtifact, SignatureSet
from agent.verify.cosign.verify import (
    VerificationReport,
    VerifiedSignature,
    evaluate,
    prepare_anchor,
    verify_image,
)


class CosignValidator:
    """Verifies cosign signatures (legacy ``.sig`` layers and Sigstore bundles) under a trust anchor."""

    scheme = "cosign"

    def _check_scheme(self, anchor: TrustAnchor) -> None:
        if anchor.scheme != self.scheme:
            raise PolicyError(
                f"trust anchor {anchor.name!r} is for scheme {anchor.scheme!r}, not {self.scheme!r}"
            )

    def check_anchor(self, anchor: TrustAnchor) -> None:
        """Raise KeyMaterialError if the anchor's key material cannot be used (call when loading policy)."""
        self._check_scheme(anchor)
        prepare_anchor(anchor)

    def verify(
        self,
        digest: Digest,
        signatures: SignatureSet | Sequence[SignatureArtifact],
        anchor: TrustAnchor,
        now: float,
        image_repository: str | None = None,
    ) -> VerifiedSignature:
        self._check_scheme(anchor)
        return verify_image(digest, signatures, anchor, now=now, image_repository=image_repository)

    def report(
        self,
        digest: Digest,
        signatures: SignatureSet | Sequence[SignatureArtifact],
        anchor: TrustAnchor,
        now: float,
        image_repository: str | None = None,
    ) -> VerificationReport:
        self._check_scheme(anchor)
        return evaluate(digest, signatures, anchor, now=now, image_repository=image_repository)
