"""The FastAPI application: ``create_app`` wires settings, database, object store and routers."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute, iter_route_contexts
from prometheus_client.multiprocess import mark_process_dead
from starlette.concurrency import run_in_threadpool
from starlette.routing import WebSocketRoute

from keystone_api.access import ROUTE_ACCESS, Device, Public
from keystone_api.deps import authorize
from keystone_api.errors import install_error_handlers
from keystone_api.middleware import RequestContextMiddleware
from keystone_api.ratelimits import install_rate_limiters
from keystone_api.routers import ROUTERS
from keystone_api.ws.recorder import RecorderHub, recorder_socket, reject_default_path
from keystone_api.ws.transfer import TransferHub, transfer_socket
from keystone_core.db import create_db_engine
from keystone_core.metrics import state_registry
from keystone_core.services.bootstrap import prepare_database
from keystone_core.settings import Settings, get_settings
from keystone_core.storage import create_s3_client

log = logging.getLogger("keystone.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API. Migrations and the admin account are handled when it starts."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = create_db_engine(settings)
        app.state.s3 = create_s3_client(settings)
        app.state.s3_probe = create_s3_client(settings, health=True)
        try:
            await run_in_threadpool(prepare_database, app.state.engine, settings)
            app.state.recorder_hub = RecorderHub(app.state.engine, settings)
            app.state.transfer_hub = TransferHub(app.state.engine, settings, app.state.s3)
            app.state.metrics_state = state_registry(
                app.state.engine, cache_s=settings.metrics_state_cache_s
            )
            await app.state.recorder_hub.start()
            await app.state.transfer_hub.start()
            log.info("keystone api ready (env=%s)", settings.env.value)
            try:
                yield
            finally:
                await app.state.transfer_hub.stop()
                await app.state.recorder_hub.stop()
        finally:
            app.state.engine.dispose()
            if settings.prometheus_multiproc_dir is not None:
                # This worker's live gauges (device sockets) leave the shared sum.
                mark_process_dead(os.getpid(), str(settings.prometheus_multiproc_dir))  # type: ignore[no-untyped-call]

    app = FastAPI(
        dependencies=[Depends(authorize)],
        title="Keystone",
        version="0.1.0",
        description="Edge data platform for robot data collection.",
        lifespan=lifespan,
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    install_rate_limiters(app, settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
            max_age=600,
        )
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_request_body_bytes)
    for router in ROUTERS:
        app.include_router(router)
    # Device sockets authenticate at the upgrade themselves (no app-wide dependency).
    app.router.routes.append(WebSocketRoute("/recorder/{device_id}", recorder_socket))
    app.router.routes.append(WebSocketRoute("/rpc", reject_default_path))
    app.router.routes.append(WebSocketRoute("/transfer/{device_id}", transfer_socket))
    check_access_table(app)
    _mark_public_operations(app)
    return app


def _mark_public_operations(app: FastAPI) -> None:
    """The bearer scheme comes from the app-wide ``authorize`` dependency, so OpenAPI would
    show it on every operation; the open ones say ``security: []`` instead."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for (method, path), rule in ROUTE_ACCESS.items():
                operation = schema.get("paths", {}).get(path, {}).get(method.lower())
                if isinstance(rule, Public | Device) and operation is not None:
                    operation["security"] = []
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]


def check_access_table(app: FastAPI) -> None:
    """Refuse to build an app with a route that has no rule in ROUTE_ACCESS.

    (Rules without a route are caught by the RBAC matrix test.)"""
    missing = sorted(set(api_routes(app)) - ROUTE_ACCESS.keys())
    if missing:
        raise RuntimeError(f"routes without an access rule in keystone_api.access: {missing}")


def api_routes(app: FastAPI) -> list[tuple[str, str]]:
    """``(method, path template)`` of every API route, included routers resolved."""
    return sorted(
        (method, context.path)
        for context in iter_route_contexts(app.routes)
        if isinstance(context.original_route, APIRoute) and context.path is not None
        for method in context.methods or ()
    )
