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

PUSHED = Digest.of(b"manifest pushed after the first inspect")
IMAGE_ID = Digest.of(b"config")


class StaleCacheEngine:
    """Serves the image without its repo digest until the cache entry is dropped."""

    def __init__(self, cached: bool) -> None:
        self.cached = cached
        self.fresh_lookups = 0
        self.removed: list[str] = []

    def container_facts(self, cid: str) -> ContainerFacts:
        digests = () if self.cached else ((ImageRef.parse(f"registry.example/app@{PUSHED}"), PUSHED),)
        if not self.cached:
            self.fresh_lookups += 1
        return ContainerFacts(cid, "app", "registry.example/app:1", IMAGE_ID, digests, "running")

    def forget_image(self, image_id: str) -> bool:
        was, self.cached = self.cached, False
        return was

    def stop_and_remove(self, cid: str, grace: int) -> str:
        self.removed.append(cid)
        return "removed"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    yield s
    s.close()


def run(store: Store, engine: StaleCacheEngine, allow: frozenset[Digest]) -> str | None:
    policy = EffectivePolicy(Enforcement(True, "enforce"), allow, ())
    e = Enforcer(engine, store, policy, EnforcementConfig(stop_grace_seconds=0), device="d", lanes=1)  # type: ignore[arg-type]
    try:
        handled = e.handle("c1", "start")
    finally:
        e.close()
    assert handled is not None
    return handled.decision.verdict


def test_stale_cache_does_not_block_an_allowed_image(store: Store) -> None:
    engine = StaleCacheEngine(cached=True)
    assert run(store, engine, frozenset({PUSHED})) == "allowed"
    assert engine.fresh_lookups == 1 and engine.removed == []


def test_fresh_negative_is_final(store: Store) -> None:
    engine = StaleCacheEngine(cached=False)
    assert run(store, engine, frozenset()) == "blocked"
    assert engine.fresh_lookups == 1  # nothing cached: no second inspect
    assert engine.removed == ["c1"]
