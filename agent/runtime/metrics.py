"""Prometheus metrics and a health check for the optional ``[metrics]`` endpoint.

Loaded only when ``[metrics] enabled = true`` (prometheus-client is imported here and nowhere else). Most
figures are read when scraped, from the parts that hold them (store counters, the enforcer, the recorder, the
engine monitor, the cloud connection), so nothing is counted twice; decisions and verification latency are
observed as they happen.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from agent import __version__
from agent.adapters.store import Store
from agent.core.records import DecisionRecord
from agent.runtime.enforcer import Enforcer
from agent.runtime.recorder import Recorder

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Sources:
    """Where the figures come from; parts that are not running report nothing."""

    store: Store
    enforcer: Enforcer
    recorder: Recorder
    engine_connected: Callable[[], bool]
    mqtt_connected: Callable[[], bool | None]  # None: no [mqtt]


class AgentMetrics(Collector):
    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._decisions: dict[tuple[str, str], int] = {}
        self.verification = Histogram(
            "imageguard_verification_seconds",
            "Time to verify an image's signature, registry round trips included",
            ["result"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=self.registry,
        )
        self.registry.register(self)
        sources.recorder.add_listener(self.on_decision)
        sources.enforcer.on_verification = self.on_verification

    # -- observed as it happens ------------------------------------------------------------------------

    def on_decision(self, record: DecisionRecord) -> None:
        key = (record.verdict or "none", record.reason.value)
        with self._lock:
            self._decisions[key] = self._decisions.get(key, 0) + 1

    def on_verification(self, seconds: float, verified: bool) -> None:
        self.verification.labels("verified" if verified else "failed").observe(seconds)

    # -- read when scraped -----------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        s = self.sources
        info = InfoMetricFamily("imageguard", "ImageGuard agent")
        info.add_metric([], {"version": __version__})
        yield info
        decisions = CounterMetricFamily(
            "imageguard_decisions", "Decisions made since the agent started", labels=["verdict", "reason"]
        )
        with self._lock:
            for (verdict, reason), n in sorted(self._decisions.items()):
                decisions.add_metric([verdict, reason], n)
        yield decisions
        counters = s.store.counters()
        dropped = CounterMetricFamily(
            "imageguard_outbox_dropped", "Telemetry messages the full outbox dropped", labels=["kind"]
        )
        lost = CounterMetricFamily(
            "imageguard_records_lost", "Records storage could not keep", labels=["kind"]
        )
        rejected = CounterMetricFamily(
            "imageguard_policy_rejected", "Policy changes refused", labels=["reason"]
        )
        for name, value in counters.items():
            for family, prefix in (
                (dropped, "outbox_dropped."),
                (lost, "records_lost."),
                (rejected, "policy_rejected."),
            ):
                if name.startswith(prefix):
                    family.add_metric([name.removeprefix(prefix)], value)
        yield from (dropped, lost, rejected)
        failures = CounterMetricFamily(
            "imageguard_enforcement_problems",
            "Engine errors, failed removals and retries of enforcement since the agent started",
            labels=["kind"],
        )
        for name, value in sorted(s.enforcer.counters.items()):
            failures.add_metric([name], value)
        yield failures
        stats = s.recorder.stats()
        yield _gauge(
            "imageguard_outbox_queued", "Telemetry messages waiting for the broker", s.store.outbox_size()
        )
        yield _gauge(
            "imageguard_storage_backlog", "Records waiting in memory for the database", stats["backlog"]
        )
        yield _gauge(
            "imageguard_storage_ok",
            "1 while the state database takes writes",
            stats["state"] == "ok" and not s.store.read_only,
        )
        yield _gauge(
            "imageguard_retry_queue",
            "Containers whose decision or removal is being retried",
            s.enforcer.pending_retries,
        )
        yield _gauge(
            "imageguard_engine_connected",
            "1 while the engine's event stream is followed",
            s.engine_connected(),
        )
        mqtt = s.mqtt_connected()
        if mqtt is not None:
            yield _gauge("imageguard_mqtt_connected", "1 while connected to the broker", mqtt)
        policy = s.enforcer.policy
        yield _gauge("imageguard_policy_version", "Version of the device policy layer", policy.version)
        yield _gauge(
            "imageguard_enforcing",
            "1 when enforcement is on in enforce mode",
            policy.enforcement.enabled and policy.enforcement.mode == "enforce",
        )

    def render(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE, generate_latest(self.registry)

    def health(self) -> tuple[int, str, bytes]:
        """200 when decisions are being made and the engine is followed; 503 with the failing checks."""
        s = self.sources
        checks: dict[str, Any] = {
            "enforcement_lanes": s.enforcer.responsive(1.0),
            "engine_events": s.engine_connected(),
            "state_storage": s.recorder.stats()["state"] == "ok" and not s.store.read_only,
        }
        if (mqtt := s.mqtt_connected()) is not None:
            checks["mqtt"] = mqtt  # reported, not required: the agent enforces offline
        healthy = checks["enforcement_lanes"] and checks["engine_events"]
        body = {"status": "ok" if healthy else "failing", "checks": checks}
        return (200 if healthy else 503), "application/json", (json.dumps(body) + "\n").encode()


def _gauge(name: str, doc: str, value: float | bool) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))
