"""The sliding-window limiter: exact counts per key, refusal with a retry time, recovery."""

from __future__ import annotations

import pytest

from keystone_core.ratelimit import RateLimited, RateLimiter


def test_limit_is_per_key_and_recovers_after_the_window() -> None:
    now = [1000.0]
    limiter = RateLimiter(limit=2, window_s=60, clock=lambda: now[0])
    limiter.hit("a")
    limiter.hit("a")
    limiter.hit("b")
    with pytest.raises(RateLimited) as refused:
        limiter.hit("a")
    assert refused.value.retry_after == 60
    now[0] += 30
    with pytest.raises(RateLimited) as again:
        limiter.hit("a")
    assert again.value.retry_after == 30
    now[0] += 30.001
    limiter.hit("a")


def test_refused_hits_do_not_extend_the_wait() -> None:
    now = [0.0]
    limiter = RateLimiter(limit=1, window_s=10, clock=lambda: now[0])
    limiter.hit("k")
    for _ in range(5):
        with pytest.raises(RateLimited):
            limiter.hit("k")
    now[0] = 10.5
    limiter.hit("k")
