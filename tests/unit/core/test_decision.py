"""The pure decision core: values in, a Decision out. No engine, no registry, no disk."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.core.anchors import TrustAnchor
from agent.core.decision import (
    NO_EVIDENCE,
    Decision,
    Evidence,
    FailedVerification,
    VerificationOutcome,
    VerifiedDigest,
    VerifyTarget,
    conclude,
    decide,
    rescan_reason,
    verify_targets,
)
from agent.core.digest import Digest
from agent.core.facts import ContainerFacts
from agent.core.imageref import ImageRef
from agent.core.policy import AllowlistEntry, EffectivePolicy, Enforcement, PolicyLayer
from agent.errors import Code

ENFORCE = Enforcement(True, "enforce")
AUDIT = Enforcement(True, "audit")
OFF = Enforcement(False, "enforce")

ACME_REPO = "registry.example:5000/acme/app"
OTHER_REPO = "registry.example:5000/other/app"
REPO_D = Digest.of(b"acme manifest")
OTHER_D = Digest.of(b"other manifest")
IMAGE_ID = Digest.of(b"image config")
UNKNOWN = Digest.of(b"unknown")

ACME = TrustAnchor("acme", "key", "PEM-A", scope=("registry.example:5000/acme/*",))
ACME_ROTATED = replace(ACME, pem="PEM-A2")
EVERY = TrustAnchor("every", "key", "PEM-E")


def facts(*repo_digests: tuple[str, Digest], image_id: Digest | None = IMAGE_ID) -> ContainerFacts:
    return ContainerFacts(
        id="c" * 64,
        name="web",
        image=repo_digests[0][0] if repo_digests else "local-build:1",
        image_id=image_id,
        repo_digests=tuple((ImageRef.parse(r), d) for r, d in repo_digests),
    )


def policy(
    enforcement: Enforcement = ENFORCE,
    allow: tuple[Digest, ...] = (),
    anchors: tuple[TrustAnchor, ...] = (),
    instances: frozenset[Digest] = frozenset(),
) -> EffectivePolicy:
    layer = PolicyLayer(
        enforcement=enforcement, allowlist=tuple(AllowlistEntry(d) for d in allow), trust_anchors=anchors
    )
    return EffectivePolicy.compose([layer], ENFORCE, instances)


def verified(d: Digest, anchor: TrustAnchor) -> Evidence:
    return Evidence({d: (VerifiedDigest(d, anchor.name, anchor.fingerprint, ACME_REPO),)}, {})


def failed(d: Digest, *anchors: str, reason: Code = Code.SIGNATURE_INVALID) -> Evidence:
    return Evidence({}, {d: FailedVerification(reason, "no signature matched", frozenset(anchors))})


SIGNED = facts((ACME_REPO, REPO_D))
LOADED = facts()  # docker load / docker build: no RepoDigests, only the image id
NO_DIGEST = facts(image_id=None)

CASES = [
    # (id, facts, policy, evidence, verdict, reason, matched, anchor)
    ("disabled", SIGNED, policy(OFF), NO_EVIDENCE, "allowed", Code.ENFORCEMENT_DISABLED, None, None),
    (
        "disabled-no-digest",
        NO_DIGEST,
        policy(OFF),
        NO_EVIDENCE,
        "allowed",
        Code.ENFORCEMENT_DISABLED,
        None,
        None,
    ),
    ("no-digest", NO_DIGEST, policy(allow=(REPO_D,)), NO_EVIDENCE, "blocked", Code.NO_DIGEST, None, None),
    ("no-digest-audit", NO_DIGEST, policy(AUDIT), NO_EVIDENCE, "would-block", Code.NO_DIGEST, None, None),
    (
        "allow-repo-digest",
        SIGNED,
        policy(allow=(REPO_D,)),
        NO_EVIDENCE,
        "allowed",
        Code.ALLOWLISTED,
        REPO_D,
        None,
    ),
    (
        "allow-image-id",
        SIGNED,
        policy(allow=(IMAGE_ID,)),
        NO_EVIDENCE,
        "allowed",
        Code.ALLOWLISTED,
        IMAGE_ID,
        None,
    ),
    (
        "allow-loaded",
        LOADED,
        policy(allow=(IMAGE_ID,)),
        NO_EVIDENCE,
        "allowed",
        Code.ALLOWLISTED,
        IMAGE_ID,
        None,
    ),
    (
        "allow-in-audit",
        LOADED,
        policy(AUDIT, allow=(IMAGE_ID,)),
        NO_EVIDENCE,
        "allowed",
        Code.ALLOWLISTED,
        IMAGE_ID,
        None,
    ),
    (
        "allow-beats-anchor",
        SIGNED,
        policy(allow=(REPO_D,), anchors=(ACME,)),
        failed(REPO_D, "acme"),
        "allowed",
        Code.ALLOWLISTED,
        REPO_D,
        None,
    ),
    (
        "instance-digest",
        LOADED,
        policy(instances=frozenset({IMAGE_ID})),
        NO_EVIDENCE,
        "allowed",
        Code.INSTANCE_DIGEST,
        IMAGE_ID,
        None,
    ),
    (
        "verified-before",
        SIGNED,
        policy(anchors=(ACME,)),
        verified(REPO_D, ACME),
        "allowed",
        Code.VERIFIED_BEFORE,
        REPO_D,
        "acme",
    ),
    (
        "verified-before-anchor-removed",
        SIGNED,
        policy(anchors=(EVERY,)),
        verified(REPO_D, ACME),
        None,
        Code.NOT_ALLOWLISTED,
        None,
        None,
    ),
    (
        "verified-before-anchor-removed-uncovered",
        SIGNED,
        policy(),
        verified(REPO_D, ACME),
        "blocked",
        Code.NOT_ALLOWLISTED,
        None,
        None,
    ),
    (
        "verified-before-anchor-changed",
        SIGNED,
        policy(anchors=(ACME_ROTATED,)),
        verified(REPO_D, ACME),
        None,
        Code.NOT_ALLOWLISTED,
        None,
        None,
    ),
    (
        "unknown-no-anchor",
        SIGNED,
        policy(allow=(UNKNOWN,)),
        NO_EVIDENCE,
        "blocked",
        Code.NOT_ALLOWLISTED,
        None,
        None,
    ),
    ("unknown-audit", SIGNED, policy(AUDIT), NO_EVIDENCE, "would-block", Code.NOT_ALLOWLISTED, None, None),
    (
        "not-in-scope",
        facts((OTHER_REPO, OTHER_D)),
        policy(anchors=(ACME,)),
        NO_EVIDENCE,
        "blocked",
        Code.NOT_ALLOWLISTED,
        None,
        None,
    ),
    (
        "loaded-with-anchor",
        LOADED,
        policy(anchors=(EVERY,)),
        NO_EVIDENCE,
        "blocked",
        Code.NOT_ALLOWLISTED,
        None,
        None,
    ),
    ("covered", SIGNED, policy(anchors=(ACME,)), NO_EVIDENCE, None, Code.NOT_ALLOWLISTED, None, None),
    (
        "covered-audit",
        SIGNED,
        policy(AUDIT, anchors=(ACME,)),
        NO_EVIDENCE,
        None,
        Code.NOT_ALLOWLISTED,
        None,
        None,
    ),
    (
        "cached-failure",
        SIGNED,
        policy(anchors=(ACME,)),
        failed(REPO_D, "acme", reason=Code.REGISTRY_UNREACHABLE),
        "blocked",
        Code.REGISTRY_UNREACHABLE,
        None,
        None,
    ),
    (
        "cached-failure-audit",
        SIGNED,
        policy(AUDIT, anchors=(ACME,)),
        failed(REPO_D, "acme"),
        "would-block",
        Code.SIGNATURE_INVALID,
        None,
        None,
    ),
    # the anchor set changed since the failure: verify again
    (
        "cached-failure-other-anchors",
        SIGNED,
        policy(anchors=(ACME, EVERY)),
        failed(REPO_D, "acme"),
        None,
        Code.NOT_ALLOWLISTED,
        None,
        None,
    ),
    (
        "cached-failure-fewer-anchors",
        SIGNED,
        policy(anchors=(ACME,)),
        failed(REPO_D, "acme", "every"),
        None,
        Code.NOT_ALLOWLISTED,
        None,
        None,
    ),
    (
        "cached-failure-other-digest",
        SIGNED,
        policy(anchors=(ACME,)),
        failed(UNKNOWN, "acme"),
        None,
        Code.NOT_ALLOWLISTED,
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    ("case", "container", "pol", "evidence", "verdict", "reason", "matched", "anchor"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_decide(
    case: str,
    container: ContainerFacts,
    pol: EffectivePolicy,
    evidence: Evidence,
    verdict: str | None,
    reason: Code,
    matched: Digest | None,
    anchor: str | None,
) -> None:
    d = decide(container, pol, evidence)
    assert (d.verdict, d.reason, d.matched, d.anchor) == (verdict, reason, matched, anchor)
    assert d.digests == container.digests
    assert d.pending is (verdict is None)
    assert bool(d.verify) is d.pending
    assert d.detail


def test_pending_decision_names_the_targets() -> None:
    both = facts((ACME_REPO, REPO_D), (OTHER_REPO, OTHER_D), (f"{ACME_REPO}-2", REPO_D))
    pol = policy(anchors=(ACME, EVERY))
    d = decide(both, pol)
    assert d.pending
    assert d.verify == (
        VerifyTarget(ImageRef.parse(f"{ACME_REPO}@{REPO_D}"), (ACME, EVERY)),
        VerifyTarget(ImageRef.parse(f"{OTHER_REPO}@{OTHER_D}"), (EVERY,)),
        VerifyTarget(ImageRef.parse(f"{ACME_REPO}-2@{REPO_D}"), (ACME, EVERY)),
    )
    assert verify_targets(both, pol) == d.verify
    # only what some anchor covers is a target
    assert verify_targets(both, policy(anchors=(ACME,))) == (
        VerifyTarget(ImageRef.parse(f"{ACME_REPO}@{REPO_D}"), (ACME,)),
        VerifyTarget(ImageRef.parse(f"{ACME_REPO}-2@{REPO_D}"), (ACME,)),
    )
    assert verify_targets(LOADED, pol) == ()


def test_negative_cache_needs_a_failure_for_every_target() -> None:
    both = facts((ACME_REPO, REPO_D), (OTHER_REPO, OTHER_D))
    pol = policy(anchors=(EVERY,))
    one = failed(REPO_D, "every")
    assert decide(both, pol, one).pending
    every_target = Evidence(
        {},
        {
            **one.failures,
            OTHER_D: FailedVerification(Code.VERIFICATION_TIMEOUT, "slow", frozenset({"every"})),
        },
    )
    d = decide(both, pol, every_target)
    assert (d.verdict, d.reason) == ("blocked", Code.SIGNATURE_INVALID)
    assert d.detail.endswith("(cached result)")


def test_verified_by_a_second_anchor_when_the_first_changed() -> None:
    pol = policy(anchors=(ACME_ROTATED, EVERY))
    evidence = Evidence(
        {
            REPO_D: (
                VerifiedDigest(REPO_D, "acme", ACME.fingerprint),
                VerifiedDigest(REPO_D, "every", EVERY.fingerprint),
            )
        },
        {},
    )
    d = decide(SIGNED, pol, evidence)
    assert (d.verdict, d.reason, d.anchor) == ("allowed", Code.VERIFIED_BEFORE, "every")


def test_decisions_depend_only_on_their_inputs() -> None:
    pol = policy(anchors=(ACME,))
    assert decide(SIGNED, pol) == decide(SIGNED, pol)


@pytest.mark.parametrize(("enforcement", "negative"), [(ENFORCE, "blocked"), (AUDIT, "would-block")])
def test_conclude(enforcement: Enforcement, negative: str) -> None:
    pol = policy(enforcement, anchors=(ACME,))
    pending = decide(SIGNED, pol)
    assert pending.pending
    success = conclude(pending, VerificationOutcome(VerifiedDigest(REPO_D, "acme", ACME.fingerprint)), pol)
    assert (success.verdict, success.reason, success.matched, success.anchor) == (
        "allowed",
        Code.SIGNATURE_VERIFIED,
        REPO_D,
        "acme",
    )
    assert success.digests == pending.digests
    assert not success.verify
    for reason in (Code.SIGNATURE_INVALID, Code.REGISTRY_UNREACHABLE, Code.VERIFICATION_TIMEOUT):
        failure = conclude(pending, VerificationOutcome(None, reason, "why"), pol)
        assert (failure.verdict, failure.reason, failure.detail, failure.matched) == (
            negative,
            reason,
            "why",
            None,
        )
        assert not failure.pending


def test_decision_pending_property() -> None:
    assert Decision(None, Code.NOT_ALLOWLISTED, "", ()).pending
    assert not Decision("blocked", Code.NOT_ALLOWLISTED, "", ()).pending


BASE = policy(allow=(REPO_D, IMAGE_ID), anchors=(ACME, EVERY), instances=frozenset({OTHER_D}))

RESCAN = [
    ("same", BASE, BASE, None),
    ("switched-on", policy(OFF), policy(ENFORCE), "enforcement switched on"),
    ("switched-on-audit", policy(OFF), policy(AUDIT), "enforcement switched on"),
    ("audit-to-enforce", policy(AUDIT), policy(ENFORCE), "enforcement switched from audit to enforce"),
    ("enforce-to-audit", policy(ENFORCE), policy(AUDIT), None),
    ("switched-off", policy(ENFORCE), policy(OFF), None),
    ("off-audit-to-off-enforce", policy(Enforcement(False, "audit")), policy(OFF), None),
    (
        "allow-lost",
        BASE,
        policy(allow=(REPO_D,), anchors=(ACME, EVERY), instances=frozenset({OTHER_D})),
        "allowlist lost entries",
    ),
    (
        "allow-gained",
        BASE,
        policy(allow=(REPO_D, IMAGE_ID, UNKNOWN), anchors=(ACME, EVERY), instances=frozenset({OTHER_D})),
        None,
    ),
    (
        "instance-withdrawn",
        BASE,
        policy(allow=(REPO_D, IMAGE_ID), anchors=(ACME, EVERY)),
        "an instance digest was withdrawn",
    ),
    (
        "instance-added",
        BASE,
        policy(allow=(REPO_D, IMAGE_ID), anchors=(ACME, EVERY), instances=frozenset({OTHER_D, UNKNOWN})),
        None,
    ),
    (
        "anchor-removed",
        BASE,
        policy(allow=(REPO_D, IMAGE_ID), anchors=(EVERY,), instances=frozenset({OTHER_D})),
        "a trust anchor was removed or changed",
    ),
    (
        "anchor-changed",
        BASE,
        policy(allow=(REPO_D, IMAGE_ID), anchors=(ACME_ROTATED, EVERY), instances=frozenset({OTHER_D})),
        "a trust anchor was removed or changed",
    ),
    (
        "anchor-added",
        policy(allow=(REPO_D, IMAGE_ID), anchors=(EVERY,), instances=frozenset({OTHER_D})),
        BASE,
        None,
    ),
]


@pytest.mark.parametrize(("case", "old", "new", "expected"), RESCAN, ids=[r[0] for r in RESCAN])
def test_rescan_reason(case: str, old: EffectivePolicy, new: EffectivePolicy, expected: str | None) -> None:
    assert rescan_reason(old, new) == expected
