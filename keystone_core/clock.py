"""The one clock: every timestamp Keystone writes comes from here so tests can move time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

_source: Callable[[], datetime] = lambda: datetime.now(UTC)  # noqa: E731


def now() -> datetime:
    """Current time as an aware UTC datetime."""
    return _source()


def as_utc(value: datetime) -> datetime:
    """Treat a naive datetime (as drivers return them) as UTC; convert aware ones to UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


@contextmanager
def frozen(at: datetime) -> Iterator[Callable[[datetime], None]]:
    """Freeze the clock at ``at`` for the block; the yielded function moves it."""
    global _source
    previous = _source
    current = [as_utc(at)]

    def move(to: datetime) -> None:
        current[0] = as_utc(to)

    _source = lambda: current[0]  # noqa: E731
    try:
        yield move
    finally:
        _source = previous
