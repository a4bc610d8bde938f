"""A cached image inspect may lack registry digests added since: a negative decision is taken again fresh."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.store import Store
from agent.config import EnforcementConfig
from agent.core.digest import Digest
from agent.core.facts import ContainerFacts
from agent.core.imageref import ImageRef
from agent.core.policy import EffectivePolicy, Enforcement
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
