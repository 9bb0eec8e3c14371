"""Rate limits for routers: per client IP and per principal, answered 429 with Retry-After.

Limiters live on ``app.state.rate_limiters`` (one set per app, so two apps in one process
never share windows); :func:`install_rate_limiters` creates them from settings.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Request

from keystone_api.deps import Principal, authorize
from keystone_core.ratelimit import RateLimiter
from keystone_core.settings import Settings

LOGIN = "login"
REGISTRATION = "registration"
CALLBACK = "callback"
# Robots behind one NAT share an address: the per-address limit is ten devices' worth.
CALLBACK_ADDRESS = "callback_address"
# A factory's registrations, ten addresses' worth: one noisy address cannot use them up
# (its refused requests are not counted here), a fleet-wide storm still stops.
REGISTRATION_FACTORY = "registration_factory"
CONFIG_DOWNLOAD = "config_download"
# Limits that are "ten devices' worth" of the per-device (or per-address) setting.
SHARED_FACTOR = 10


def install_rate_limiters(app: FastAPI, settings: Settings) -> None:
    app.state.rate_limiters = {
        LOGIN: RateLimiter(settings.login_rate_per_minute, 60.0),
        REGISTRATION: RateLimiter(settings.registration_rate_per_minute, 60.0),
        REGISTRATION_FACTORY: RateLimiter(
            SHARED_FACTOR * settings.registration_rate_per_minute, 60.0
        ),
        CALLBACK: RateLimiter(settings.callback_rate_per_minute, 60.0),
        CALLBACK_ADDRESS: RateLimiter(SHARED_FACTOR * settings.callback_rate_per_minute, 60.0),
        CONFIG_DOWNLOAD: RateLimiter(settings.config_download_rate_per_minute, 60.0),
    }


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def hit(request: Request, name: str, *keys: str) -> None:
    """Count one request under each key of limiter ``name``; RateLimited when one is full."""
    limiter: RateLimiter = request.app.state.rate_limiters[name]
    for key in keys:
        limiter.hit(key)


class PerClient:
    """Dependency: limit ``name`` per client IP, and per principal when there is one."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(
        self, request: Request, principal: Annotated[Principal | None, Depends(authorize)]
    ) -> None:
        keys = [f"ip:{client_ip(request)}"]
        if principal is not None:
            keys.append(f"user:{principal.user.id}")
        hit(request, self.name, *keys)
