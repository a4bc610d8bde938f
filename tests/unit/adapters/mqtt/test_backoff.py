from __future__ import annotations

import random

import pytest

from agent.adapters.mqtt.connection import Backoff


def test_grows_exponentially_with_jitter_within_bounds() -> None:
    b = Backoff(1.0, 30.0, random.Random(1))
    delays = [b.next() for _ in range(12)]
    caps = [min(30.0, 2.0**n) for n in range(12)]
    for d, cap in zip(delays, caps, strict=True):
        assert max(1.0, cap / 2) <= d <= cap
    assert len({round(d, 6) for d in delays[6:]}) > 1  # jittered, not lock-step at the cap
    b.reset()
    assert b.next() == 1.0


def test_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(5, 1)
