"""Rollout planning and stepping (agent/console/rollouts.py): pure functions."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.console.rollouts import (
    bump_version,
    convergence_series,
    next_step,
    parse_waves,
    plan_waves,
    summary,
)
from agent.errors import InputError


def test_parse_waves() -> None:
    assert parse_waves("1, 10%,100%") == ("1", "10%", "100%")
    assert parse_waves(["5", "50%"]) == ("5", "50%")
    for bad in ("", "0", "1,,2", "101%", "0%", "ten", "-1", "1.5", ",".join(["1"] * 21)):
        with pytest.raises(InputError):
            parse_waves(bad)


def test_plan_waves_canary_then_percentages() -> None:
    devices = [f"d{i:02}" for i in range(10)]
    plan = dict(plan_waves(devices, ("1", "30%", "100%")))
    assert plan["d00"] == 0
    assert sorted(d for d, w in plan.items() if w == 1) == ["d01", "d02"]
    assert sum(1 for w in plan.values() if w == 2) == 7
    # the last wave always reaches everyone, and empty waves are dropped
    assert dict(plan_waves(devices, ("50%",))) == {d: (0 if i < 5 else 1) for i, d in enumerate(devices)}
    assert set(dict(plan_waves(["a"], ("1", "50%", "100%"))).values()) == {0}
    assert plan_waves([], ("1",)) == []


@given(
    st.lists(st.text("abcdef", min_size=1, max_size=4), max_size=40),
    st.lists(
        st.one_of(st.integers(1, 50).map(str), st.integers(1, 100).map(lambda p: f"{p}%")),
        min_size=1,
        max_size=6,
    ),
)
def test_plan_waves_covers_every_target_once_in_order(devices: list[str], waves: list[str]) -> None:
    plan = plan_waves(devices, waves)
    assert sorted(d for d, _ in plan) == sorted(set(devices))
    numbers = [w for _, w in plan]
    assert numbers == sorted(numbers)
    assert set(numbers) == set(range(len(set(numbers))))  # no gaps


def _r(**kw: Any) -> dict[str, Any]:
    return {
        "wave": 0,
        "wave_timeout": 30.0,
        "wave_started_at": 100.0,
        "max_rejections": 0,
        "max_alerts": 0,
        **kw,
    }


def _row(device: str, wave: int, state: str) -> dict[str, Any]:
    return {"device": device, "wave": wave, "state": state}


def test_steps_through_waves() -> None:
    rows = [_row("a", 0, "pending"), _row("b", 1, "pending")]
    assert next_step(_r(wave=-1), rows, 0, 100).action == "start"
    step = next_step(_r(), rows, 0, 100)
    assert (step.action, step.devices) == ("send", ("a",))
    rows[0]["state"] = "sent"
    assert next_step(_r(), rows, 0, 110).action == "wait"
    expired = next_step(_r(), rows, 0, 131)
    assert (expired.action, expired.devices) == ("expire", ("a",)) and "30" in expired.reason
    rows[0]["state"] = "applied"
    assert (next_step(_r(), rows, 0, 110).action, next_step(_r(), rows, 0, 110).wave) == ("start", 1)
    rows[1]["state"] = "unchanged"
    assert next_step(_r(wave=1), rows, 0, 110).action == "complete"
    assert next_step(_r(), [], 0, 0).action == "complete"


def test_thresholds_stop_the_rollout() -> None:
    rows = [_row("a", 0, "rejected"), _row("b", 1, "pending")]
    step = next_step(_r(), rows, 0, 100)
    assert step.action == "stop" and "1 device(s) rejected" in step.reason
    assert next_step(_r(max_rejections=1), rows, 0, 100).action != "stop"
    assert next_step(_r(max_rejections=None), rows, 0, 100).action != "stop"
    rows[0]["state"] = "applied"
    step = next_step(_r(max_alerts=2), rows, 3, 100)
    assert step.action == "stop" and "3 new alert(s)" in step.reason
    assert next_step(_r(max_alerts=None), rows, 99, 100).action != "stop"


def test_summary_and_convergence() -> None:
    rows = [
        {"device": "a", "wave": 0, "state": "applied", "answered_at": 12.0},
        {"device": "b", "wave": 1, "state": "unchanged", "answered_at": 11.0},
        {"device": "c", "wave": 1, "state": "rejected", "answered_at": 13.0},
        {"device": "d", "wave": 1, "state": "offline", "answered_at": None},
    ]
    s = summary(rows)
    assert (s["targets"], s["holding"], s["rejected"], s["offline"], s["converged"]) == (4, 2, 1, 1, 50.0)
    assert convergence_series(rows, 10.0) == [(1.0, 1), (2.0, 2)]
    assert summary([])["converged"] == 100.0


def test_bump_version() -> None:
    assert bump_version({"version": 1, "allowlist": []}, 5) == {"version": 5, "allowlist": []}
    with pytest.raises(InputError, match="sign"):
        bump_version({"document": {"version": 1}, "signature": {}}, 5)


def test_a_soak_holds_the_next_wave_back() -> None:
    rows = [{"device": "a", "wave": 0, "state": "applied", "answered_at": 100.0}, _row("b", 1, "pending")]
    r = _r(soak_seconds=10.0, wave_started_at=99.0)
    step = next_step(r, rows, 0, 105.0)
    assert step.action == "wait" and "10" in step.reason
    assert next_step(r, rows, 0, 110.5).action == "start"
    assert next_step(r, rows, 1, 105.0).action == "stop"  # an alert meanwhile stops it before wave 2
