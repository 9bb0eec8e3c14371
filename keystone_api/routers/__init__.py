"""One router per domain; ``ROUTERS`` is what the app mounts."""

from fastapi import APIRouter

from keystone_api.routers import (
    audit,
    auth,
    catalog,
    episodes,
    health,
    metrics,
    organizations,
    people,
    production,
    robots,
    stations,
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
)
