"""A cached image inspect may lack registry digests added since: a negative decision is taken again fresh."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.store import Store
from agent.config import EnforcementConfig
from agent.core.digest import Digest
from agent.core.facts import ContainerEvent, ContainerFacts
from agent.core.imageref import ImageRef
from agent.core.policy import EffectivePolicy, Enforcement
from agent.errors import Code, EngineError
from agent.runtime.enforcer import Enforcer
from tests.support.fakes import FakeEngine

PUSHED = Digest.of(b"manifest pushed after the first inspect")
IMAGE_ID = Digest.of(b"config")


class StaleCache:
    """An image cache that lacks the registry digest a later pull added, until it is forgotten."""

    def __init__(self, cached: bool) -> None:
        self.cached = cached
        self.fresh_lookups = 0

    def facts(self, cid: str) -> ContainerFacts:
        digests = () if self.cached else ((ImageRef.parse(f"registry.example/app@{PUSHED}"), PUSHED),)
        if not self.cached:
            self.fresh_lookups += 1
        return ContainerFacts(cid, "app", "registry.example/app:1", IMAGE_ID, digests, "running")

    def forget(self, image_id: str) -> bool:
        was, self.cached = self.cached, False
        return was

    def engine(self) -> FakeEngine:
        return FakeEngine(lookup=self.facts, forget=self.forget)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    yield s
    s.close()


def run(store: Store, engine: FakeEngine, allow: frozenset[Digest]) -> str | None:
    policy = EffectivePolicy(Enforcement(True, "enforce"), allow, ())
    e = Enforcer(engine, store, policy, EnforcementConfig(stop_grace_seconds=0), device="d", lanes=1)
    try:
        handled = e.handle("c1", "start")
    finally:
        e.close()
    assert handled is not None
    return handled.decision.verdict


def test_stale_cache_does_not_block_an_allowed_image(store: Store) -> None:
    cache = StaleCache(cached=True)
    engine = cache.engine()
    assert run(store, engine, frozenset({PUSHED})) == "allowed"
    assert cache.fresh_lookups == 1 and engine.removed == []


def test_fresh_negative_is_final(store: Store) -> None:
    cache = StaleCache(cached=False)
    engine = cache.engine()
    assert run(store, engine, frozenset()) == "blocked"
    assert cache.fresh_lookups == 1  # nothing cached: no second inspect
    assert engine.removed == [("c1", 0)]


# -- the kill rule: no grace for what was never allowed ------------------------------------------------


def grace_after(store: Store, first: frozenset[Digest] | None, trigger: str) -> list[tuple[str, int]]:
    """Decide c1 once under ``first`` (if given), then under an empty allowlist; the removals made."""
    engine = FakeEngine(
        {"c1": ContainerFacts("c1", "app", "registry.example/app:1", IMAGE_ID, (), "running")}
    )
    e = Enforcer(
        engine,
        store,
        EffectivePolicy(Enforcement(True, "enforce"), first or frozenset(), ()),
        EnforcementConfig(stop_grace_seconds=7),
        device="d",
        lanes=1,
    )
    try:
        if first is not None:
            e.handle("c1", "start")
        e.set_policy(EffectivePolicy(Enforcement(True, "enforce"), frozenset(), ()))
        e.handle("c1", trigger)
        deadline = time.monotonic() + 5
        while not engine.removed and time.monotonic() < deadline:  # a graceful stop runs on its own thread
            time.sleep(0.01)
    finally:
        e.close()
    return engine.removed


def test_a_container_never_allowed_is_killed_without_grace(store: Store) -> None:
    assert grace_after(store, None, "start") == [("c1", 0)]
    assert grace_after(store, None, "scan") == [("c1", 0)]


def test_a_container_allowed_before_gets_the_grace_period(store: Store) -> None:
    assert grace_after(store, frozenset({IMAGE_ID}), "rescan") == [("c1", 7)]


def test_a_stored_allowed_decision_counts_after_a_restart_but_not_for_a_start_event(store: Store) -> None:
    # an agent that allowed c1 and then stopped: its last stored decision on c1 is "allowed"
    assert run_allowed_once(store) == []
    assert grace_after(store, None, "start") == [("c1", 0)]  # a start event is never a withdrawal
    assert run_allowed_once(store) == []
    assert grace_after(store, None, "scan") == [("c1", 7)]  # a new enforcer knows it from the store


def run_allowed_once(store: Store) -> list[tuple[str, int]]:
    engine = FakeEngine(
        {"c1": ContainerFacts("c1", "app", "registry.example/app:1", IMAGE_ID, (), "running")}
    )
    policy = EffectivePolicy(Enforcement(True, "enforce"), frozenset({IMAGE_ID}), ())
    e = Enforcer(engine, store, policy, EnforcementConfig(stop_grace_seconds=7), device="d", lanes=1)
    try:
        e.handle("c1", "start")
    finally:
        e.close()
    return engine.removed


# -- never let go -------------------------------------------------------------------------------------


class Flaky(FakeEngine):
    """Fails the first ``failures`` calls of one method with an engine error, then behaves."""

    def __init__(self, method: str, failures: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.method, self.failures = method, failures

    def _maybe_fail(self, method: str) -> None:
        if method == self.method and self.failures > 0:
            self.failures -= 1
            raise EngineError(f"{method}: the engine timed out")

    def container_facts(self, container_id: str) -> ContainerFacts:
        self._maybe_fail("container_facts")
        return super().container_facts(container_id)

    def stop_and_remove(self, container_id: str, grace_seconds: int) -> str:
        self._maybe_fail("stop_and_remove")
        return super().stop_and_remove(container_id, grace_seconds)


BLOCKED_FACTS = {"c1": ContainerFacts("c1", "app", "registry.example/app:1", IMAGE_ID, (), "running")}


def enforcer_on(store: Store, engine: FakeEngine) -> Enforcer:
    return Enforcer(
        engine,
        store,
        EffectivePolicy(Enforcement(True, "enforce"), frozenset(), ()),
        EnforcementConfig(stop_grace_seconds=0),
        device="d",
        lanes=1,
    )


@pytest.mark.parametrize("method", ["container_facts", "stop_and_remove"])
def test_an_engine_failure_is_retried_until_the_container_is_removed(store: Store, method: str) -> None:
    engine = Flaky(method, 2, containers=BLOCKED_FACTS)
    e = enforcer_on(store, engine)
    try:
        e.submit("c1", "start")
        deadline = time.monotonic() + 10
        while not engine.removed and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        e.close()
    assert engine.removed == [("c1", 0)]
    assert e.counters["retries"] == 2
    assert store.counters()["retries"] == 2  # counted where status reads it too


def test_a_container_gone_before_inspection_still_leaves_a_record(store: Store) -> None:
    e = enforcer_on(store, FakeEngine())
    event = ContainerEvent("c9", "start", 1, image="registry.example/evil:1", name="fast-rm")
    try:
        handled = e.submit("c9", "start", event).result(timeout=10)
    finally:
        e.close()
    assert handled is not None
    assert (handled.record.verdict, handled.record.reason) == ("blocked", Code.VANISHED)
    (_, saved), *_ = store.decisions(1)
    assert saved["container"]["name"] == "fast-rm" and saved["image"] == "registry.example/evil:1"
    kinds = [m.kind for m in store.outbox_peek()]
    assert kinds == []  # telemetry off here; with it on an alert is queued (test_records)


def test_the_periodic_check_decides_only_what_has_no_decision(store: Store) -> None:
    engine = FakeEngine(containers=dict(BLOCKED_FACTS))
    e = enforcer_on(store, engine)
    try:
        assert e.reconcile() == 1  # never seen: decided now (a lost event)
        deadline = time.monotonic() + 5
        while not engine.removed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.removed == [("c1", 0)]
        assert e.reconcile() == 0  # decided: a list and a set look-up, nothing more
    finally:
        e.close()


# -- a slow registry delays nobody else --------------------------------------------------------------


class BlockedVerifier:
    """Answers only when released, like a registry that stalls until the deadline."""

    def __init__(self) -> None:
        import threading

        self.release = threading.Event()
        self.calls = 0

    def verify(self, targets: Any, timeout: float) -> Any:
        from agent.core.decision import VerificationOutcome

        self.calls += 1
        self.release.wait(10)
        return VerificationOutcome(None, Code.REGISTRY_UNREACHABLE, "stalled registry")


def test_a_pending_verification_does_not_delay_a_container_on_the_same_lane(store: Store) -> None:
    from agent.core.anchors import TrustAnchor

    signed = Digest.of(b"slow registry image")
    engine = FakeEngine(
        {
            "c1": ContainerFacts(
                "c1", "slow", "slow.example/app:1", IMAGE_ID,
                ((ImageRef.parse(f"slow.example/app@{signed}"), signed),), "running",
            ),
            "c2": ContainerFacts("c2", "evil", "registry.example/evil:1", IMAGE_ID, (), "running"),
        }
    )  # fmt: skip
    anchor = TrustAnchor("slow", "key", "unused", scope=("slow.example/**",))
    verifier = BlockedVerifier()
    e = Enforcer(
        engine,
        store,
        EffectivePolicy(Enforcement(True, "enforce"), frozenset(), (anchor,)),
        EnforcementConfig(stop_grace_seconds=0),
        device="d",
        verifier=verifier,
        lanes=1,  # both containers share the one lane
        cgroups=lambda cid: None,
    )
    try:
        e.submit("c1", "start")
        e.submit("c2", "start")
        deadline = time.monotonic() + 5
        while ("c2", 0) not in engine.removed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.removed == [("c2", 0)], "c2 was decided while c1's registry stalled"
        assert verifier.calls == 1 and e.reconcile() == 0  # c1 is neither forgotten nor verified twice
        verifier.release.set()
        deadline = time.monotonic() + 5
        while ("c1", 0) not in engine.removed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ("c1", 0) in engine.removed
    finally:
        e.close()


class RecordingCgroup:
    def __init__(self) -> None:
        self.killed = 0

    def kill(self) -> None:
        self.killed += 1

    def freeze(self) -> None:
        pass

    def thaw(self) -> None:
        pass

    def frozen(self) -> bool:
        return False


def test_a_removal_dockerd_does_not_answer_kills_through_the_cgroup(store: Store) -> None:
    """dockerd holds the container's lock (an unfinished docker cp): its processes die anyway."""
    engine = Flaky("stop_and_remove", 1, containers=BLOCKED_FACTS)
    cg = RecordingCgroup()
    e = Enforcer(
        engine,
        store,
        EffectivePolicy(Enforcement(True, "enforce"), frozenset(), ()),
        EnforcementConfig(stop_grace_seconds=5),
        device="d",
        lanes=1,
        cgroups=lambda cid: cg,  # type: ignore[arg-type,return-value]
    )
    try:
        e._remove(BLOCKED_FACTS["c1"], None, 5)  # type: ignore[arg-type]
        assert cg.killed == 1
        deadline = time.monotonic() + 10
        while not engine.removed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.removed, "removed once dockerd answers"
    finally:
        e.close()
