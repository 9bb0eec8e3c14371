"""One router per domain; ``ROUTERS`` is what the app mounts."""

from fastapi import APIRouter

from keystone_api.routers import auth, health, metrics, organizations

ROUTERS: tuple[APIRouter, ...] = (
    auth.router,
    health.router,
    metrics.router,
    organizations.router,
)
