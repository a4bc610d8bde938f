"""Issue 11: the gate at a container's cgroup creation (Enforcer.gate), on fakes of the engine and cgroup.

What it settles there and what it leaves to the start event; that it never asks dockerd for an inspect (dockerd
holds the container's lock for the whole start, which waits for the gate); and that it touches only this
engine's containers, only in enforce mode.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from agent.adapters.store import Store
from agent.config import EnforcementConfig
from agent.core.anchors import TrustAnchor
from agent.core.constraints import RuntimeFacts
from agent.core.digest import Digest
from agent.core.facts import ContainerFacts
from agent.core.imageref import ImageRef
from agent.core.policy import EffectivePolicy, Enforcement
from agent.errors import EngineError
from agent.runtime.enforcer import Enforcer
from tests.support.fakes import FakeEngine

ALLOWED = Digest.of(b"allowed image")
OTHER = Digest.of(b"other image")
SIGNED = Digest.of(b"signed manifest")


def facts(cid: str, image_id: Digest, state: str = "created", repo: Digest | None = None) -> ContainerFacts:
    digests = ((ImageRef.parse(f"registry.example/app@{repo}"), repo),) if repo else ()
    return ContainerFacts(cid, cid, "registry.example/app:1", image_id, digests, state, {}, RuntimeFacts())


class Cgroup:
    """A container cgroup that records what was done to it."""

    def __init__(self, frozen: bool = False) -> None:
        self.is_frozen = frozen
        self.freezes = self.thaws = self.kills = 0

    def freeze(self) -> None:
        self.freezes += 1
        self.is_frozen = True

    def thaw(self) -> None:
        self.thaws += 1
        self.is_frozen = False

    def kill(self) -> None:
        assert self.is_frozen, "killed while running: it should be frozen first"
        self.kills += 1

    def frozen(self) -> bool:
        return self.is_frozen


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    yield s
    s.close()


def enforcer(
    store: Store,
    engine: FakeEngine,
    mode: str = "enforce",
    anchors: tuple[TrustAnchor, ...] = (),
) -> Enforcer:
    policy = EffectivePolicy(Enforcement(True, mode), frozenset({ALLOWED}), anchors)  # type: ignore[arg-type]
    return Enforcer(engine, store, policy, EnforcementConfig(stop_grace_seconds=5), device="d", lanes=2)


def settle(e: Enforcer) -> None:
    """Every held start decided (no more gate decisions after this), and every lane has run what was queued."""
    e._gates.shutdown(wait=True)
    assert e.responsive(5)


def wait_removed(engine: FakeEngine, cid: str) -> None:
    deadline = time.monotonic() + 5
    while not any(r[0] == cid for r in engine.removed) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_blocked_image_is_killed_while_frozen_then_removed_without_any_inspect(store: Store) -> None:
    engine = FakeEngine({"c1": facts("c1", OTHER)})
    e = enforcer(store, engine)
    cg = Cgroup()
    try:
        e._know(("c1",))  # listed by a scan (no create event: nothing was fetched after a create)
        e.gate("c1", cg)  # type: ignore[arg-type]
        assert cg.freezes == 1
        settle(e)
        wait_removed(engine, "c1")
    finally:
        e.close()
    assert cg.kills == 1 and cg.thaws == 0  # never thawed: its entrypoint never ran
    assert engine.removed == [("c1", 0)]  # never allowed: no grace
    assert engine.listings >= 1 and engine.lookups == 0  # an inspect would wait for the start, which waits
    [(_, record)] = store.decisions()
    assert (record["verdict"], record["reason"], record["action"]) == ("blocked", "not-allowlisted", "remove")
    assert e.counters["killed_before_entrypoint"] == 1


def test_allowed_on_full_facts_is_thawed_and_its_start_event_not_decided_again(store: Store) -> None:
    engine = FakeEngine({"c1": facts("c1", ALLOWED)})
    e = enforcer(store, engine)
    cg = Cgroup()
    try:
        e._know(("c1",))
        done: Future[ContainerFacts] = Future()
        done.set_result(engine.containers["c1"])  # the inspect made after the create has answered
        e._prefetch["c1"] = done
        e.gate("c1", cg)  # type: ignore[arg-type]
        settle(e)
        assert cg.thaws == 1 and not cg.is_frozen
        lookups = engine.lookups
        assert e.submit("c1", "start").result(5) is None  # the start event: already decided
        assert engine.lookups == lookups and cg.freezes == 1
    finally:
        e.close()
    assert [r["verdict"] for _, r in store.decisions()] == ["allowed"]
    assert engine.removed == []


def test_allowed_on_the_list_alone_is_left_to_the_start_event(store: Store) -> None:
    """The list says nothing of how the container is started: runtime constraints are checked at start."""
    engine = FakeEngine({"c1": facts("c1", ALLOWED)})
    e = enforcer(store, engine)
    cg = Cgroup()
    try:
        e._know(("c1",))
        e.gate("c1", cg)  # type: ignore[arg-type]
        settle(e)
        assert cg.thaws == 1 and store.decisions() == []
        handled = e.submit("c1", "start").result(5)
        assert handled is not None and handled.decision.verdict == "allowed"
    finally:
        e.close()
    assert engine.lookups == 1  # the start event inspected it


def test_an_image_to_verify_is_thawed_and_verified_at_its_start(store: Store) -> None:
    anchor = TrustAnchor("k", "key", "unused", scope=("registry.example/**",))
    engine = FakeEngine({"c1": facts("c1", OTHER, repo=SIGNED)})
    e = enforcer(store, engine, anchors=(anchor,))
    cg = Cgroup()
    try:
        e._know(("c1",))
        e.gate("c1", cg)  # type: ignore[arg-type]
        settle(e)
    finally:
        e.close()
    assert (cg.freezes, cg.thaws, cg.kills) == (1, 1, 0)
    assert store.decisions() == [] and engine.removed == []


def test_a_create_event_fetches_the_facts_the_gate_settles_on(store: Store) -> None:
    engine = FakeEngine({"c1": facts("c1", OTHER)})
    e = enforcer(store, engine)
    try:
        e.created("c1")
        deadline = time.monotonic() + 5
        while engine.lookups == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        e.close()
    assert engine.lookups == 1


def test_another_engines_container_is_never_frozen(store: Store) -> None:
    engine = FakeEngine({"c1": facts("c1", OTHER)})
    e = enforcer(store, engine)
    cg = Cgroup()
    try:
        e.gate("c1", cg)  # no create event, no listing named it
        settle(e)
    finally:
        e.close()
    assert cg.freezes == 0 and engine.listings == 0


def test_a_container_destroyed_is_forgotten(store: Store) -> None:
    engine = FakeEngine({"c1": facts("c1", OTHER)})
    e = enforcer(store, engine)
    cg = Cgroup()
    try:
        e._know(("c1",))
        e.destroyed("c1")
        e.gate("c1", cg)  # type: ignore[arg-type]
    finally:
        e.close()
    assert cg.freezes == 0


def test_audit_mode_freezes_nothing(store: Store) -> None:
    engine = FakeEngine({"c1": facts("c1", OTHER)})
    e = enforcer(store, engine, mode="audit")
    cg = Cgroup()
    try:
        e.created("c1")
        e.gate("c1", cg)  # type: ignore[arg-type]
    finally:
        e.close()
    assert cg.freezes == 0


def test_an_engine_error_thaws_for_the_start_event_to_decide(store: Store) -> None:
    engine = FakeEngine({"c1": facts("c1", OTHER)}, list_error=EngineError("engine refused to list"))
    e = enforcer(store, engine)
    cg = Cgroup()
    try:
        e._know(("c1",))
        e.gate("c1", cg)  # type: ignore[arg-type]
        settle(e)
    finally:
        e.close()
    assert (cg.thaws, cg.kills) == (1, 0) and engine.removed == []


@pytest.mark.parametrize(
    ("state", "frozen", "decided"),
    [
        ("created", True, True),  # its start is held by a freeze nobody will lift: decided again
        ("running", True, False),  # frozen after its start: the scan finds it (Enforcer.handle)
        ("paused", True, False),  # the user's docker pause
        ("created", False, False),  # not held
    ],
)
def test_recovery_decides_only_starts_left_frozen(
    store: Store, state: str, frozen: bool, decided: bool
) -> None:
    engine = FakeEngine({"c1": facts("c1", OTHER, state=state)})
    e = enforcer(store, engine)
    cg = Cgroup(frozen=frozen)
    try:
        found = e.recover_gated([("c1", cg)])  # type: ignore[list-item]
        settle(e)
        wait_removed(engine, "c1") if decided else None
    finally:
        e.close()
    assert found == (1 if decided else 0)
    assert cg.kills == (1 if decided else 0)
    assert engine.removed == ([("c1", 0)] if decided else [])


def test_recovery_skips_another_engines_cgroups(store: Store) -> None:
    engine = FakeEngine({})
    e = enforcer(store, engine)
    cg = Cgroup(frozen=True)
    try:
        assert e.recover_gated([("c9", cg)]) == 0  # type: ignore[list-item]
    finally:
        e.close()
    assert cg.thaws == 0 and cg.kills == 0


def test_a_scan_leaves_a_held_start_to_the_gate(store: Store) -> None:
    """dockerd holds the container's lock for its start, which waits for the gate: a scan's inspect of it
    would wait too (until the engine timeout), so a scan does not look at it."""
    engine = FakeEngine({"c1": facts("c1", OTHER)})
    e = enforcer(store, engine)
    try:
        e._gated["c1"] = Cgroup(frozen=True)  # type: ignore[assignment]
        assert e.handle("c1", "scan") is None
        assert e.reconcile() == 0  # nor does the periodic check
    finally:
        e._gated.clear()
        e.close()
    assert engine.lookups == 0 and engine.removed == []


def test_a_start_event_that_comes_while_held_is_decided_once_the_gate_lets_go(store: Store) -> None:
    """On a busy host the watch may see the cgroup late, after the start event: that event is not lost."""
    engine = FakeEngine({"c1": facts("c1", ALLOWED)})
    e = enforcer(store, engine)
    cg = Cgroup(frozen=True)
    try:
        e._know(("c1",))
        e._gated["c1"] = cg  # type: ignore[assignment]
        assert e.submit("c1", "start").result(5) is None  # set aside while held
        e._decide_gated("c1")  # allowed on the list alone: let go, and the start is decided now
        settle(e)
    finally:
        e.close()
    assert [r["verdict"] for _, r in store.decisions()] == ["allowed"]
    assert engine.lookups == 1 and not cg.is_frozen
