"""Enforcer.authorize: the pre-start decision records like the monitor, never acts, and bounds verification."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.engine import Gone
from agent.adapters.store import Store
from agent.config import EnforcementConfig
from agent.core.anchors import TrustAnchor
from agent.core.decision import VerificationOutcome, VerifiedDigest, VerifyTarget
from agent.core.digest import Digest
from agent.core.facts import ContainerFacts
from agent.core.imageref import ImageRef
from agent.core.policy import AllowlistEntry, EffectivePolicy, Enforcement, PolicyLayer
from agent.core.schemas import validate
from agent.errors import Code
from agent.runtime.enforcer import Enforcer
from tests.support.fakes import FakeEngine

REPO = "registry.example:5000/acme/app"
SIGNED_D = Digest.of(b"signed manifest")
LISTED_D = Digest.of(b"listed manifest")
UNLISTED_D = Digest.of(b"unlisted manifest")
ACME = TrustAnchor("acme", "key", "PEM-A", scope=("registry.example:5000/acme/*",))


def facts(cid: str, digest: Digest, repo: str = "local/app") -> ContainerFacts:
    return ContainerFacts(
        id=cid,
        name=f"name-{cid}",
        image=f"{repo}:1",
        image_id=Digest.of(cid.encode()),
        repo_digests=((ImageRef.parse(f"{repo}@{digest}"), digest),),
        state="created",
    )


CONTAINERS = {
    "listed": facts("listed", LISTED_D),
    "unlisted": facts("unlisted", UNLISTED_D),
    "signed": facts("signed", SIGNED_D, REPO),
}


class SlowVerifier:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0
        self.done = threading.Event()

    def verify(self, targets: tuple[VerifyTarget, ...], timeout: float) -> VerificationOutcome:
        self.calls += 1
        time.sleep(self.delay)
        t = targets[0]
        assert t.ref.digest is not None
        self.done.set()
        return VerificationOutcome(VerifiedDigest(t.ref.digest, "acme", ACME.fingerprint, str(t.ref)))


def policy(mode: str = "enforce") -> EffectivePolicy:
    layer = PolicyLayer(
        enforcement=Enforcement(True, mode),  # type: ignore[arg-type]
        allowlist=(AllowlistEntry(LISTED_D),),
        trust_anchors=(ACME,),
    )
    return EffectivePolicy.compose([layer], Enforcement())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    yield s
    s.close()


def enforcer(store: Store, verifier: SlowVerifier | None, timeout: float = 0.3) -> Enforcer:
    settings = EnforcementConfig(verify_timeout_seconds=timeout, negative_cache_seconds=60)
    return Enforcer(
        FakeEngine(CONTAINERS, read_only=True),
        store,
        policy(),
        settings,
        device="dev-1",
        verifier=verifier,
        telemetry=True,
        lanes=1,
    )


CASES = [
    # (container, verdict, reason, action)
    ("listed", "allowed", Code.ALLOWLISTED, "none"),
    ("unlisted", "blocked", Code.NOT_ALLOWLISTED, "deny"),
]


@pytest.mark.parametrize(("cid", "verdict", "reason", "action"), CASES)
def test_authorize_records_like_the_monitor(
    store: Store, cid: str, verdict: str, reason: Code, action: str
) -> None:
    e = enforcer(store, None)
    try:
        handled = e.authorize(cid)
    finally:
        e.close()
    assert handled.decision.verdict == verdict and handled.decision.reason == reason
    (_, saved), *_ = store.decisions(10)
    assert saved == handled.record.to_dict()
    validate(saved, "decision", "decision record")
    assert (saved["trigger"], saved["action"], saved["verdict"]) == ("prevented", action, verdict)
    kinds = [m.kind for m in store.outbox_peek()]
    assert kinds == (["verdicts"] if verdict == "allowed" else ["verdicts", "alerts"])
    for m in store.outbox_peek():
        assert m.message["trigger"] == "prevented"


def test_unknown_container_raises_gone(store: Store) -> None:
    e = enforcer(store, None)
    try:
        with pytest.raises(Gone):
            e.authorize("nope")
    finally:
        e.close()
    assert store.decisions(10) == []


def test_slow_verification_is_refused_at_the_timeout_and_cached_later(store: Store) -> None:
    verifier = SlowVerifier(delay=1.0)
    e = enforcer(store, verifier, timeout=0.2)
    try:
        t0 = time.monotonic()
        first = e.authorize("signed")
        waited = time.monotonic() - t0
        assert first.decision.verdict == "blocked"
        assert first.decision.reason == Code.VERIFICATION_TIMEOUT
        assert first.record.action == "deny"
        assert 0.2 <= waited < 0.9, waited  # did not wait for the verifier
        # the verification runs on; its result lets the next start through without verifying again
        assert verifier.done.wait(5)
        deadline = time.monotonic() + 5
        while SIGNED_D not in store.verified() and time.monotonic() < deadline:
            time.sleep(0.02)
        e.reload_verified()
        second = e.authorize("signed")
        assert second.decision.verdict == "allowed"
        assert second.decision.reason == Code.VERIFIED_BEFORE
        assert verifier.calls == 1
    finally:
        e.close()


def test_fast_verification_allows(store: Store) -> None:
    verifier = SlowVerifier(delay=0.0)
    e = enforcer(store, verifier, timeout=2)
    try:
        handled = e.authorize("signed")
    finally:
        e.close()
    assert handled.decision.reason == Code.SIGNATURE_VERIFIED
    assert handled.record.anchor == "acme" and handled.record.action == "none"


def test_without_a_verifier_a_covered_image_is_refused(store: Store) -> None:
    e = enforcer(store, None)
    try:
        handled = e.authorize("signed")
    finally:
        e.close()
    assert handled.decision.verdict == "blocked"
    assert handled.decision.reason == Code.VERIFICATION_ERROR


def test_monitor_skips_a_start_just_allowed_under_the_same_policy(store: Store) -> None:
    e = enforcer(store, None)
    try:
        e.authorize("listed")
        engine = e.engine
        assert isinstance(engine, FakeEngine)
        before = engine.lookups
        assert e.handle("listed", "start") is None  # the start event of the allowed start
        assert engine.lookups == before
        again = e.handle("listed", "start")  # consumed: a later start (restart policy) is decided again
        assert again is not None and again.record.trigger == "start"
        e.authorize("listed")
        e.set_policy(policy())  # a new policy: the earlier answer no longer stands
        assert e.handle("listed", "start") is not None
        e.authorize("unlisted")  # only allowed starts are remembered
        handled = e.handle("unlisted", "start")  # decided again: the monitor removes it
        assert handled is not None and handled.record.action == "remove"
    finally:
        e.close()
