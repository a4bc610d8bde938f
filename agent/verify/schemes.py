"""Signature validators, one per signature scheme, chosen through one explicit map keyed by
``TrustAnchor.scheme``. Adding Notation later means one module and one entry here.

The result types are cosign's for now (the only scheme); they move to a neutral module when a second
scheme arrives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from agent.core.anchors import TrustAnchor
from agent.core.digest import Digest
from agent.errors import UnsupportedSchemeError
from agent.verify.cosign.artifacts import SignatureArtifact, SignatureSet
from agent.verify.cosign.validator import CosignValidator
from agent.verify.cosign.verify import SignatureOutcome, VerificationReport, VerifiedSignature

__all__ = [
    "VALIDATORS",
    "SignatureOutcome",
    "Validator",
    "VerificationReport",
    "VerifiedSignature",
    "validator_for",
]


class Validator(Protocol):
    scheme: str

    def check_anchor(self, anchor: TrustAnchor) -> None:
        """Raise KeyMaterialError/PolicyError if ``anchor`` cannot be used by this scheme."""

    def verify(
        self,
        digest: Digest,
        signatures: SignatureSet | Sequence[SignatureArtifact],
        anchor: TrustAnchor,
        now: float,
        image_repository: str | None = None,
    ) -> VerifiedSignature:
        """Return the signature that verifies, or raise VerificationError with one reason per signature."""

    def report(
        self,
        digest: Digest,
        signatures: SignatureSet | Sequence[SignatureArtifact],
        anchor: TrustAnchor,
        now: float,
        image_repository: str | None = None,
    ) -> VerificationReport:
        """Per-signature results, for ``imageguard verify --json``."""


VALIDATORS: dict[str, Validator] = {
    CosignValidator.scheme: CosignValidator(),
}


def validator_for(anchor_or_scheme: TrustAnchor | str) -> Validator:
    """The validator for a trust anchor's scheme; UnsupportedSchemeError for a scheme nobody implements."""
    scheme = anchor_or_scheme if isinstance(anchor_or_scheme, str) else anchor_or_scheme.scheme
    try:
        return VALIDATORS[scheme]
    except KeyError:
        known = ", ".join(sorted(VALIDATORS))
        raise UnsupportedSchemeError(
            f"signature scheme {scheme!r} is not supported; supported schemes: {known}"
        ) from None
