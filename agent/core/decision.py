"""The pure decision core: which containers may run. No clock, no network, no disk.

Reviewers read the rules here. Everything this module needs arrives as values; the enforcer around it
does the I/O and carries out what it returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from agent.core.anchors import TrustAnchor
from agent.core.constraints import violation
from agent.core.digest import Digest
from agent.core.facts import ContainerFacts
from agent.core.imageref import ImageRef
from agent.core.policy import EffectivePolicy
from agent.errors import Code

Verdict = Literal["allowed", "blocked", "would-block"]


@dataclass(frozen=True, slots=True)
class VerifiedDigest:
    """A digest some anchor vouched for (persisted; valid while that anchor is unchanged)."""

    digest: Digest
    anchor: str
    anchor_fingerprint: str
    repository: str = ""
    signature: str = ""
    verified_at: str = ""


@dataclass(frozen=True, slots=True)
class FailedVerification:
    """A recent negative result (kept briefly, in memory, so a burst of starts costs one verification)."""

    reason: Code
    detail: str
    anchors: frozenset[str]


@dataclass(frozen=True, slots=True)
class VerifyTarget:
    """One digest to verify in one repository, with the anchors whose scope covers that repository."""

    ref: ImageRef  # always carries the digest
    anchors: tuple[TrustAnchor, ...]


@dataclass(frozen=True, slots=True)
class Evidence:
    verified: Mapping[Digest, tuple[VerifiedDigest, ...]]
    failures: Mapping[Digest, FailedVerification]


NO_EVIDENCE = Evidence({}, {})


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a container. ``verify`` non-empty means: not decided until those are checked."""

    verdict: Verdict | None
    reason: Code
    detail: str
    digests: tuple[Digest, ...]
    matched: Digest | None = None
    anchor: str | None = None
    verify: tuple[VerifyTarget, ...] = ()

    @property
    def pending(self) -> bool:
        return self.verdict is None


def _negative(policy: EffectivePolicy) -> Verdict:
    return "would-block" if policy.enforcement.mode == "audit" else "blocked"


def _still_trusted(record: VerifiedDigest, policy: EffectivePolicy) -> bool:
    anchor = policy.anchor(record.anchor)
    return anchor is not None and anchor.fingerprint == record.anchor_fingerprint


def verify_targets(facts: ContainerFacts, policy: EffectivePolicy) -> tuple[VerifyTarget, ...]:
    """Where signatures can be looked up: each repo digest whose repository some anchor covers."""
    targets = []
    for ref, digest in facts.repo_digests:
        anchors = policy.anchors_for(ref)
        if anchors:
            targets.append(VerifyTarget(ref.with_digest(digest), anchors))
    return tuple(targets)


def decide(facts: ContainerFacts, policy: EffectivePolicy, evidence: Evidence = NO_EVIDENCE) -> Decision:
    """Decide from what is known now; may ask for verification (``Decision.verify``)."""
    digests = facts.digests
    if not policy.enforcement.enabled:
        return Decision("allowed", Code.ENFORCEMENT_DISABLED, "enforcement is switched off", digests)
    if facts.runtime is not None:  # before the digests: an allowed image started as root on the host is not
        broken = violation(facts.runtime, facts.image_ref, policy.runtime, policy.protected)
        if broken is not None:
            return Decision(_negative(policy), Code.RUNTIME_CONSTRAINT, broken, digests)
    if not digests:
        return Decision(
            _negative(policy), Code.NO_DIGEST, "the engine reports no digest for the image", digests
        )
    for d in digests:
        if d in policy.allowlist:
            return Decision("allowed", Code.ALLOWLISTED, f"{d} is on the allowlist", digests, matched=d)
    for d in digests:
        if d in policy.instance_digests:
            return Decision(
                "allowed", Code.INSTANCE_DIGEST, f"{d} is pinned by an enabled instance", digests, d
            )
    for d in digests:
        for record in evidence.verified.get(d, ()):
            if _still_trusted(record, policy):
                return Decision(
                    "allowed",
                    Code.VERIFIED_BEFORE,
                    f"{d} was verified with trust anchor {record.anchor!r}",
                    digests,
                    matched=d,
                    anchor=record.anchor,
                )
    targets = verify_targets(facts, policy)
    if not targets:
        if facts.repo_digests or not policy.trust_anchors:
            detail = "no allowlist entry and no trust anchor covers the image"
        else:
            detail = "no allowlist entry; the image has no registry digest, so no signature can be looked up"
        return Decision(_negative(policy), Code.NOT_ALLOWLISTED, detail, digests)
    # a recent failure under the same anchors stands in for a new verification
    for t in targets:
        failure = evidence.failures.get(t.ref.digest) if t.ref.digest else None
        if failure is None or failure.anchors != frozenset(a.name for a in t.anchors):
            break
    else:
        first = evidence.failures[targets[0].ref.digest]  # type: ignore[index]
        return Decision(_negative(policy), first.reason, first.detail + " (cached result)", digests)
    return Decision(None, Code.NOT_ALLOWLISTED, "verification needed", digests, verify=targets)


@dataclass(frozen=True, slots=True)
class VerificationOutcome:
    """What the verifier found for a pending decision: a success, or the reason nothing verified."""

    verified: VerifiedDigest | None
    reason: Code = Code.SIGNATURE_INVALID
    detail: str = ""


def conclude(pending: Decision, outcome: VerificationOutcome, policy: EffectivePolicy) -> Decision:
    """Turn a pending decision into a final one once verification has answered."""
    if outcome.verified is not None:
        v = outcome.verified
        return Decision(
            "allowed",
            Code.SIGNATURE_VERIFIED,
            f"{v.digest} signature verified with trust anchor {v.anchor!r}",
            pending.digests,
            matched=v.digest,
            anchor=v.anchor,
        )
    return Decision(_negative(policy), outcome.reason, outcome.detail, pending.digests)


def rescan_reason(old: EffectivePolicy, new: EffectivePolicy) -> str | None:
    """Why a policy change needs every container looked at again (None: later starts suffice)."""
    if new.enforcement.enabled and not old.enforcement.enabled:
        return "enforcement switched on"
    if new.enforcement.enabled and old.enforcement.mode == "audit" and new.enforcement.mode == "enforce":
        return "enforcement switched from audit to enforce"
    if old.allowlist - new.allowlist:
        return "allowlist lost entries"
    if old.instance_digests - new.instance_digests:
        return "an instance digest was withdrawn"
    if new.runtime != old.runtime or new.protected != old.protected:
        return "runtime constraints changed"
    new_anchors = {a.name: a.fingerprint for a in new.trust_anchors}
    if any(new_anchors.get(a.name) != a.fingerprint for a in old.trust_anchors):
        return "a trust anchor was removed or changed"
    return None
