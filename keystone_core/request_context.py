"""The id of the API request being served, for logs, audit rows, outbox events and run tags.

The API's middleware sets it for the life of a request (``X-Request-ID``, given or made);
work done outside a request (Dagster runs, the CLI) sees ``None``. A ContextVar follows the
request into FastAPI's thread pool, so synchronous route code sees it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_request_id: ContextVar[str | None] = ContextVar("keystone_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being served, or None outside a request."""
    return _request_id.get()


@contextmanager
def bound_request_id(request_id: str | None) -> Iterator[None]:
    """Make ``request_id`` the current request id for the duration of the block."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)
