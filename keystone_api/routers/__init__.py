"""One router per domain; ``ROUTERS`` is what the app mounts."""

from fastapi import APIRouter

from keystone_api.routers import (
    audit,
    auth,
    callbacks,
    catalog,
    devices,
    episodes,
    health,
    inspections,
    metrics,
    organizations,
    people,
    production,
    qa,
    recorder,
    robots,
    stations,
    sync,
    transfer,
)

ROUTERS: tuple[APIRouter, ...] = (
    auth.router,
    health.router,
    metrics.router,
    organizations.router,
    stations.router,
    robots.router,
    people.router,
    catalog.router,
    audit.router,
    production.router,
    episodes.router,
    qa.router,
    inspections.router,
    sync.router,
    devices.router,
    callbacks.router,
    recorder.router,
    transfer.router,
)
