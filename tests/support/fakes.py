"""Typed in-memory fakes for unit tests of pure logic around one outside system (never of the system itself).

Each implements the Protocol its consumer declares, so mypy checks the fake against the real interface.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.adapters.engine import Gone
from agent.core.facts import ContainerFacts, facts_for_create
from agent.core.policy import EffectivePolicy, Enforcement
from agent.runtime.enforcer import ContainerEngine


@dataclass
class FakeEngine:
    """Containers by id; records every action. ``lookup`` may replace the dictionary look-up."""

    containers: Mapping[str, ContainerFacts] = field(default_factory=dict)
    lookup: Callable[[str], ContainerFacts] | None = None
    #: image inspect data by the reference a create request names
    images: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    #: refuse every action (stop, pause, ...): for code that must only look
    read_only: bool = False
    forget: Callable[[str], bool] = lambda _image_id: False
    lookups: int = 0
    #: lock-free list look-ups (listed_facts), and the error they raise if set
    listings: int = 0
    list_error: Exception | None = None
    removed: list[tuple[str, int]] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)
    unpaused: list[str] = field(default_factory=list)

    def container_ids(self) -> list[str]:
        return list(self.containers)

    def container_facts(self, container_id: str) -> ContainerFacts:
        self.lookups += 1
        if self.lookup is not None:
            return self.lookup(container_id)
        if container_id not in self.containers:
            raise Gone(container_id)
        return self.containers[container_id]

    def listed_facts(self, container_id: str) -> ContainerFacts:
        """What the lock-free list says: the same container, without its runtime facts."""
        self.listings += 1
        if self.list_error is not None:
            raise self.list_error
        if container_id not in self.containers:
            raise Gone(container_id)
        return dataclasses.replace(self.containers[container_id], runtime=None)

    def facts_for_create(self, request: dict[str, Any], name: str) -> ContainerFacts:
        return facts_for_create(request, name, self.images.get(str(request.get("Image", ""))))

    def forget_image(self, image_id: str) -> bool:
        return self.forget(image_id)

    def _act(self, what: str) -> None:
        if self.read_only:
            raise AssertionError(f"this code must not act on the engine ({what})")

    def stop_and_remove(self, container_id: str, grace_seconds: int) -> str:
        self._act("stop_and_remove")
        self.removed.append((container_id, grace_seconds))
        return "removed"

    def pause(self, container_id: str) -> None:
        self._act("pause")
        self.paused.append(container_id)

    def unpause(self, container_id: str) -> None:
        self._act("unpause")
        self.unpaused.append(container_id)

    def close(self) -> None:
        pass


# -- what the authorization plugin's gate reads of the enforcer (agent/runtime/authz.py) --------------


@dataclass
class FakeFacts:
    id: str = "c0ffee0000"
    name: str = "web"
    image: str = "acme/app:1"
    short_id: str = "c0ffee"


@dataclass
class FakeDecision:
    verdict: str
    reason: Any
    detail: str


@dataclass
class FakeHandled:
    decision: FakeDecision
    facts: FakeFacts


class FakeEnforcer:
    """The enforcer's live policy and ``authorize``: answers ``outcome`` (or raises it)."""

    def __init__(self, enforcement: Enforcement, outcome: Any) -> None:
        self.policy = EffectivePolicy.compose([], enforcement)
        self.outcome = outcome
        self.calls: list[str] = []

    def authorize(self, ref: str) -> Any:
        self.calls.append(ref)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def _conforms(engine: FakeEngine) -> ContainerEngine:
    return engine  # mypy checks FakeEngine against the enforcer's Protocol here
