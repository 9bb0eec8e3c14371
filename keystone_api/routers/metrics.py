"""Prometheus exposition at /metrics (optionally protected by a static token).

One scrape gives this process's metrics — or, in multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``), the sum over every process sharing that directory (API
workers, and Dagster runs on the same host) — followed by the factory state read from the
database (``keystone_core.metrics``).
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from keystone_api.deps import SettingsDep
from keystone_core.errors import AuthenticationError
from keystone_core.metrics import exposition

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, 401: {"description": "token required"}},
)
async def metrics(request: Request, settings: SettingsDep) -> Response:
    """Prometheus text format from prometheus-client's registries."""
    if settings.metrics_token is not None:
        expected = f"Bearer {settings.metrics_token.get_secret_value()}"
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise AuthenticationError("metrics token required", code="unauthorized")
    state = getattr(request.app.state, "metrics_state", None)
    extra = (state,) if state is not None else ()
    # The state collector queries the database: keep it off the event loop.
    body = await run_in_threadpool(exposition, settings.prometheus_multiproc_dir, *extra)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
