"""A sliding-window rate limiter keyed by any string (client IP, account, principal).

Windows live in this process's memory: a limit is per API process, which is what a
brute-force guard needs (N replicas allow at most N times the limit). Nothing else depends on
this state, so losing it on restart loses nothing.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from keystone_core.errors import KeystoneError


class RateLimited(KeystoneError):
    """Too many requests; ``retry_after`` seconds until one more is allowed."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


@dataclass
class RateLimiter:
    """At most ``limit`` hits per ``window_s`` seconds for each key."""

    limit: int
    window_s: float
    clock: Callable[[], float] = time.monotonic
    _hits: dict[str, deque[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def hit(self, key: str) -> None:
        """Count one hit for ``key`` or raise RateLimited (the refused hit is not counted)."""
        now = self.clock()
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - self.window_s:
                hits.popleft()
            if len(hits) >= self.limit:
                retry_after = max(1, math.ceil(hits[0] + self.window_s - now))
                raise RateLimited(
                    f"too many requests; retry in {retry_after}s", retry_after=retry_after
                )
            hits.append(now)
            if len(self._hits) > 10_000:
                self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        idle = [k for k, h in self._hits.items() if not h or h[-1] <= now - self.window_s]
        for key in idle:
            del self._hits[key]
