"""Rollouts in waves: planning and the next step, as pure functions (no I/O; agent/console/orchestrator.py acts).

A rollout delivers one version of a group's layer to the group's devices (or to a named list of them) in
waves. ``waves`` lists how far each wave reaches, cumulatively: ``["1", "10%", "100%"]`` is a canary of one
device, then up to a tenth of the targets, then all. After each wave the rollout waits until every device
of the wave answered (or ``wave_timeout`` passed: the silent ones count as offline), then checks its
thresholds: more rejections than ``max_rejections``, or more alerts than ``max_alerts`` from devices after
they took the layer, stop it. ``None`` means no limit. With ``soak_seconds`` the next wave waits that long
after the last answer of this one, so that alerts caused by the new layer can arrive and stop the rollout
before it reaches more devices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from agent.console.fleetdb import HOLDS, OFFLINE, PENDING, REJECTED, SENT
from agent.errors import InputError

_WAVE = re.compile(r"^(?:[1-9][0-9]{0,6}|(?:100|[1-9][0-9]?)%)$")
DEFAULT_WAVES = ("1", "50%", "100%")


def parse_waves(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"1,10%,100%"`` (or a list): each item a device count or a percentage of the targets, growing."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    if not items or not all(items):
        raise InputError("waves: give at least one wave, like '1,50%,100%'")
    for item in items:
        if not _WAVE.match(item):
            raise InputError(f"waves: {item!r} is neither a device count (1, 5) nor a percentage (10%, 100%)")
    if len(items) > 20:
        raise InputError("waves: at most 20 waves")
    return tuple(items)


def plan_waves(targets: Sequence[str], waves: Sequence[str]) -> list[tuple[str, int]]:
    """Each target with its wave number; the last wave always reaches every target. Waves that would add
    no device are dropped, so wave numbers run without gaps."""
    ordered = sorted(set(targets))
    n = len(ordered)
    reach: list[int] = []
    for item in waves:
        k = math.ceil(n * int(item[:-1]) / 100) if item.endswith("%") else int(item)
        reach.append(min(n, max(k, reach[-1] if reach else 0)))
    if not reach or reach[-1] < n:
        reach.append(n)
    plan: list[tuple[str, int]] = []
    start, wave = 0, 0
    for end in reach:
        if end > start:
            plan.extend((d, wave) for d in ordered[start:end])
            wave += 1
            start = end
    return plan


def wave_count(rows: Sequence[Mapping[str, Any]]) -> int:
    return 1 + max((int(r["wave"]) for r in rows), default=-1)


@dataclass(frozen=True)
class Step:
    """What the orchestrator does next with a running rollout."""

    action: Literal["wait", "start", "send", "expire", "stop", "complete"]
    wave: int = -1
    devices: tuple[str, ...] = ()
    reason: str = ""


def next_step(rollout: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], alerts: int, now: float) -> Step:
    """The next step of a running rollout, from its per-device rows and the alerts counted since."""
    rejected = sum(1 for r in rows if r["state"] == REJECTED)
    limit = rollout.get("max_rejections")
    if limit is not None and rejected > limit:
        return Step("stop", reason=f"{rejected} device(s) rejected the layer (threshold {limit})")
    limit = rollout.get("max_alerts")
    if limit is not None and alerts > limit:
        return Step(
            "stop", reason=f"{alerts} new alert(s) from devices that took the layer (threshold {limit})"
        )
    wave = int(rollout["wave"])
    total = wave_count(rows)
    if total == 0:
        return Step("complete", reason="no device to deliver to")
    if wave < 0:
        return Step("start", wave=0)
    mine = [r for r in rows if r["wave"] == wave]
    pending = tuple(r["device"] for r in mine if r["state"] == PENDING)
    if pending:
        return Step("send", wave=wave, devices=pending)
    waiting = tuple(r["device"] for r in mine if r["state"] == SENT)
    if waiting:
        started = rollout.get("wave_started_at") or now
        if now - started < float(rollout["wave_timeout"]):
            return Step("wait", wave=wave)
        return Step(
            "expire", wave=wave, devices=waiting, reason=f"no answer within {rollout['wave_timeout']:g}s"
        )
    if wave + 1 < total:
        soak = float(rollout.get("soak_seconds") or 0)
        last = max((float(r.get("answered_at") or 0) for r in mine), default=0.0)
        if soak and now - max(last, float(rollout.get("wave_started_at") or 0)) < soak:
            return Step("wait", wave=wave, reason=f"watching wave {wave + 1} for {soak:g}s")
        return Step("start", wave=wave + 1)
    return Step("complete")


def summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts per state and the share of targets that hold the version (convergence)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    total = len(rows)
    holding = sum(counts.get(s, 0) for s in HOLDS)
    return {
        "targets": total,
        "holding": holding,
        "rejected": counts.get(REJECTED, 0),
        "offline": counts.get(OFFLINE, 0),
        "waiting": counts.get(SENT, 0),
        "pending": counts.get(PENDING, 0),
        "states": counts,
        "converged": round(100.0 * holding / total, 1) if total else 100.0,
    }


def convergence_series(rows: Sequence[Mapping[str, Any]], start: float) -> list[tuple[float, int]]:
    """(seconds since ``start``, devices holding the version) at each answer: convergence over time."""
    times = sorted(float(r["answered_at"]) for r in rows if r["state"] in HOLDS and r.get("answered_at"))
    return [(t - start, i + 1) for i, t in enumerate(times)]


def bump_version(document: Mapping[str, Any], version: int) -> dict[str, Any]:
    """An unsigned layer document at another version (a rollback re-issues the old content, newer)."""
    if "signature" in document:
        raise InputError(
            "the layer to go back to was signed; sign its content again at version "
            f"{version} ('imageguard console sign-policy') and roll that out"
        )
    return {**document, "version": version}
