"""Prometheus exposition at /metrics (optionally protected by a static token)."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from keystone_api.deps import SettingsDep
from keystone_core.errors import AuthenticationError

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, 401: {"description": "token required"}},
)
def metrics(request: Request, settings: SettingsDep) -> Response:
    """Prometheus text format from prometheus-client's registry."""
    if settings.metrics_token is not None:
        expected = f"Bearer {settings.metrics_token.get_secret_value()}"
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise AuthenticationError("metrics token required", code="unauthorized")
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
