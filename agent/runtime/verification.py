"""Signature verification for enforcement and the CLI: registry lookups (adapter) + validators (pure).

The enforcer hands over what to verify (digest, repository, anchors); this module fetches the signatures,
asks the validator of each anchor's scheme, and turns every failure into a reason code. It never raises
for a bad image: what goes wrong is the answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from agent.adapters.dockerhost import DockerHost
from agent.adapters.registry import RegistryClient
from agent.adapters.signatures import fetch_signatures
from agent.config import Config
from agent.core.anchors import TrustAnchor
from agent.core.decision import VerificationOutcome, VerifiedDigest, VerifyTarget
from agent.core.digest import Digest
from agent.core.imageref import ImageRef
from agent.core.records import utc_now
from agent.errors import Code, ImageGuardError, RegistryError, RegistryUnreachable, VerificationError
from agent.verify.cosign.artifacts import SignatureSet
from agent.verify.schemes import VerificationReport, VerifiedSignature, validator_for

log = logging.getLogger(__name__)


@dataclass
class ImageResult:
    """Everything learnt about one image: what verified it, or every reason it did not."""

    ref: ImageRef
    digest: Digest | None
    verified: VerifiedSignature | None = None
    anchor: TrustAnchor | None = None
    reasons: list[str] = field(default_factory=list)
    reports: list[VerificationReport] = field(default_factory=list)
    unreachable: bool = False
    requests: int = 0

    @property
    def reason(self) -> Code:
        """The verdict as the enforcer's reason code (what decision records carry)."""
        if self.verified is not None:
            return Code.SIGNATURE_VERIFIED
        return Code.REGISTRY_UNREACHABLE if self.unreachable else Code.SIGNATURE_INVALID

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "image": str(self.ref),
            "digest": str(self.digest) if self.digest else None,
            "valid": self.verified is not None,
            "reason": self.reason.value,
            "requests": self.requests,
        }
        if self.verified is not None:
            out["anchor"] = self.verified.anchor
            out["signature"] = {
                "origin": self.verified.origin,
                "signer": self.verified.description,
                "signing_time": self.verified.signing_time,
                "tlog_verified": self.verified.tlog_verified,
            }
        else:
            out["reasons"] = self.reasons
        out["anchors"] = [r.to_dict() for r in self.reports]
        return out


def verify_reference(
    client: RegistryClient,
    ref: ImageRef,
    anchors: Iterable[TrustAnchor],
    *,
    now: float,
    full_report: bool = False,
) -> ImageResult:
    """Resolve ``ref`` (a tag costs one request), fetch its signatures and verify under any anchor.

    Legacy ``.sig`` signatures are read first and bundles only if none of those verified, which keeps
    the common case at two requests for a digest reference. ``full_report`` adds a per-anchor report of
    every signature fetched (for ``--json``) without fetching more than the verdict needs.
    """
    anchors = list(anchors)
    result = ImageResult(ref, ref.digest)
    start_count = client.request_count
    try:
        digest = client.resolve(ref)
        result.digest = digest

        def enough(found: SignatureSet) -> bool:
            for anchor in anchors:
                try:
                    result.verified = validator_for(anchor).verify(
                        digest, found, anchor, now, image_repository=ref.name
                    )
                    result.anchor = anchor
                    return True
                except ImageGuardError:
                    continue
            return False

        found = fetch_signatures(client, ref, digest, enough=enough)
        if result.verified is None or full_report:
            for anchor in anchors:
                try:
                    validator = validator_for(anchor)
                    report = validator.report(digest, found, anchor, now, image_repository=ref.name)
                    result.reports.append(report)
                    if result.verified is None and report.verified is not None:
                        result.verified = validator.verify(
                            digest, found, anchor, now, image_repository=ref.name
                        )
                        result.anchor = anchor
                    elif report.verified is None:
                        if not report.outcomes:
                            result.reasons.append(f"anchor {anchor.name!r}: no signatures found for {digest}")
                        result.reasons.extend(f"anchor {anchor.name!r}: {o.reason}" for o in report.outcomes)
                except VerificationError as exc:
                    result.reasons.extend(f"anchor {anchor.name!r}: {r}" for r in exc.reasons)
                except ImageGuardError as exc:  # unusable anchor material, unknown scheme
                    result.reasons.append(f"anchor {anchor.name!r}: {exc}")
    except RegistryUnreachable as exc:
        result.unreachable = True
        result.reasons.append(f"registry {ref.registry} unreachable: {exc}")
    except RegistryError as exc:
        result.reasons.append(f"registry {ref.registry}: {exc}")
    result.requests = client.request_count - start_count
    if result.verified is None and not result.reasons:
        result.reasons.append(
            "no trust anchor applies to this image" if not anchors else "no signature verified"
        )
    return result


#: verifications in flight against one registry: a hostile or stalled registry holds at most this many
#: workers (each until its deadline closes the socket), so images from other registries always get one
PER_REGISTRY = 2
WORKERS = 16


class ImageVerifier:
    """The enforcer's verifier: bounded in time, never raises."""

    def __init__(
        self, config: Config, *, clock: Callable[[], float] = time.time, per_registry: int = PER_REGISTRY
    ) -> None:
        self.config = config
        self.clock = clock
        self.per_registry = per_registry
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="verify")
        self._lock = threading.Lock()
        self._slots: dict[str, threading.BoundedSemaphore] = {}

    def _slot(self, registry: str) -> threading.BoundedSemaphore:
        with self._lock:
            slot = self._slots.get(registry)
            if slot is None:
                slot = self._slots[registry] = threading.BoundedSemaphore(self.per_registry)
            return slot

    def _client(self, timeout: float) -> RegistryClient:
        return RegistryClient(
            self.config, timeout=min(timeout, 10.0), deadline=timeout, docker_host=DockerHost()
        )

    def verify(self, targets: tuple[VerifyTarget, ...], timeout: float) -> VerificationOutcome:
        future = self._pool.submit(self._verify_all, targets, timeout)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            names = ", ".join(str(t.ref) for t in targets)
            return VerificationOutcome(
                None, Code.VERIFICATION_TIMEOUT, f"verification of {names} took longer than {timeout:g}s"
            )

    def _verify_all(self, targets: tuple[VerifyTarget, ...], timeout: float) -> VerificationOutcome:
        reasons: list[str] = []
        all_unreachable = True
        end = time.monotonic() + timeout
        with self._client(timeout) as client:
            for target in targets:
                slot = self._slot(target.ref.registry)
                if not slot.acquire(timeout=max(0.0, end - time.monotonic())):
                    reasons.append(
                        f"{target.ref}: registry {target.ref.registry} is busy with {self.per_registry} "
                        "verifications that have not finished (slow or stalled registry)"
                    )
                    continue
                try:
                    result = verify_reference(client, target.ref, target.anchors, now=self.clock())
                finally:
                    slot.release()
                if result.verified is not None and result.anchor is not None:
                    v = result.verified
                    log.info(
                        "verified %s with trust anchor %r (%s; %d registry requests)",
                        target.ref,
                        v.anchor,
                        v.origin,
                        result.requests,
                    )
                    return VerificationOutcome(
                        VerifiedDigest(
                            digest=v.digest,
                            anchor=v.anchor,
                            anchor_fingerprint=result.anchor.fingerprint,
                            repository=target.ref.name,
                            signature=f"{v.origin} ({v.description})",
                            verified_at=utc_now(),
                        )
                    )
                log.info(
                    "signature verification of %s failed (%s; %d registry requests): %s",
                    target.ref,
                    result.reason.value,
                    result.requests,
                    "; ".join(result.reasons),
                )
                all_unreachable = all_unreachable and result.unreachable
                reasons.extend(f"{target.ref}: {r}" for r in result.reasons)
        if all_unreachable:
            return VerificationOutcome(None, Code.REGISTRY_UNREACHABLE, "; ".join(reasons))
        return VerificationOutcome(None, Code.SIGNATURE_INVALID, "; ".join(reasons))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def build_verifier(config: Config) -> ImageVerifier:
    return ImageVerifier(config)
