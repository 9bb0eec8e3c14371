"""Who may call what: the one table of every route and the roles it admits.

``create_app`` refuses to start when a route has no entry here (or an entry names no
route), and the RBAC matrix test iterates this table, so a route can never be added
without deciding who may call it. A row of another factory is answered 404 by the
services, never 403, so existence does not leak.
"""

from __future__ import annotations

from dataclasses import dataclass

from keystone_core.models import Role


@dataclass(frozen=True)
class Public:
    """A route deliberately open without credentials, with the reason why."""

    reason: str


@dataclass(frozen=True)
class Device:
    """A route for the Axon programs: the handler checks a device or per-task token."""

    reason: str


Rule = frozenset[Role] | Public | Device

ADMIN = frozenset({Role.ADMIN})
MANAGERS = frozenset({Role.ADMIN, Role.PRODUCTION_MANAGER})
PRODUCTION = frozenset({Role.ADMIN, Role.PRODUCTION_MANAGER, Role.DATA_COLLECTOR})
QUALITY = frozenset({Role.ADMIN, Role.PRODUCTION_MANAGER, Role.DATA_INSPECTOR})
INSPECTORS = frozenset({Role.ADMIN, Role.DATA_INSPECTOR})
EVERYONE = frozenset(Role)


def _crud(
    base: str, *, read: frozenset[Role], write: frozenset[Role], update: str = "PUT"
) -> dict[tuple[str, str], Rule]:
    item = f"{base}/{{id}}"
    return {
        ("GET", base): read,
        ("POST", base): write,
        ("GET", item): read,
        (update, item): write,
        ("DELETE", item): write,
    }


V1 = "/api/v1"

ROUTE_ACCESS: dict[tuple[str, str], Rule] = {
    # Open by design.
    ("POST", f"{V1}/auth/login"): Public("sign-in (rate-limited)"),
    ("GET", f"{V1}/health"): Public("readiness probe for load balancers and operators"),
    ("GET", f"{V1}/health/live"): Public("liveness probe"),
    ("GET", "/metrics"): Public("Prometheus scrape; KEYSTONE_METRICS_TOKEN protects it"),
    ("GET", f"{V1}/robot_types/{{id}}/configs/{{filename}}"): Public(
        "axon-config downloads rendered templates without credentials; no secrets inside"
    ),
    ("POST", f"{V1}/devices/register"): Public(
        "axon-config registers without credentials; accepted only inside an admin-opened "
        "enrollment window, rate-limited and audited"
    ),
    # The recorder's callbacks: its per-task user_token or the device token.
    ("POST", f"{V1}/callbacks/start"): Device("the task's user_token or the device token"),
    ("POST", f"{V1}/callbacks/finish"): Device("the task's user_token or the device token"),
    # The caller's own account.
    ("GET", f"{V1}/auth/me"): EVERYONE,
    ("POST", f"{V1}/auth/logout"): EVERYONE,
    ("POST", f"{V1}/auth/password"): EVERYONE,
    # Organization and sites.
    **_crud(f"{V1}/organizations", read=EVERYONE, write=ADMIN),
    **_crud(f"{V1}/factories", read=EVERYONE, write=ADMIN),
    **_crud(f"{V1}/stations", read=PRODUCTION, write=MANAGERS),
    ("POST", f"{V1}/stations/lookup"): PRODUCTION,
    # Robots.
    **_crud(f"{V1}/robot_types", read=EVERYONE, write=ADMIN),
    ("GET", f"{V1}/robot_types/{{id}}/config_templates"): MANAGERS,
    ("GET", f"{V1}/robot_types/{{id}}/config_templates/{{filename}}"): MANAGERS,
    ("PUT", f"{V1}/robot_types/{{id}}/config_templates/{{filename}}"): ADMIN,
    ("DELETE", f"{V1}/robot_types/{{id}}/config_templates/{{filename}}"): ADMIN,
    **_crud(f"{V1}/robots", read=PRODUCTION, write=MANAGERS),
    ("GET", f"{V1}/robots/{{id}}/workstation_history"): MANAGERS,
    ("POST", f"{V1}/robots/{{id}}/ws-client-auth-token/rotate"): ADMIN,
    # Device onboarding.
    ("POST", f"{V1}/enrollment_windows"): ADMIN,
    ("GET", f"{V1}/enrollment_windows"): ADMIN,
    ("GET", f"{V1}/enrollment_windows/{{id}}"): ADMIN,
    ("POST", f"{V1}/enrollment_windows/{{id}}/close"): ADMIN,
    # Recorders: presence, state and the REST → RPC façade.
    ("GET", f"{V1}/recorder/devices"): PRODUCTION,
    ("GET", f"{V1}/recorder/{{device_id}}/state"): PRODUCTION,
    ("GET", f"{V1}/recorder/{{device_id}}/stats"): PRODUCTION,
    **{
        ("POST", f"{V1}/recorder/{{device_id}}/{action}"): PRODUCTION
        for action in ("config", "begin", "finish", "pause", "resume", "cancel", "clear", "quit")
    },
    ("GET", f"{V1}/device-state/stream"): EVERYONE,
    # Transfer programs.
    ("GET", f"{V1}/transfer/devices"): PRODUCTION,
    **{
        ("POST", f"{V1}/transfer/{{device_id}}/{action}"): MANAGERS
        for action in ("upload_request", "upload_all", "status_query", "cancel")
    },
    # People.
    **_crud(f"{V1}/data_collectors", read=MANAGERS, write=MANAGERS),
    **_crud(f"{V1}/inspectors", read=QUALITY, write=MANAGERS),
    **_crud(f"{V1}/users", read=ADMIN, write=ADMIN),
    # Catalog.
    **_crud(f"{V1}/scenes", read=EVERYONE, write=MANAGERS),
    **_crud(f"{V1}/subscenes", read=EVERYONE, write=MANAGERS),
    **_crud(f"{V1}/skills", read=EVERYONE, write=MANAGERS),
    **_crud(f"{V1}/sops", read=EVERYONE, write=MANAGERS),
    # Production.
    **_crud(f"{V1}/orders", read=MANAGERS, write=MANAGERS),
    **_crud(f"{V1}/batches", read=PRODUCTION, write=MANAGERS, update="PATCH"),
    ("GET", f"{V1}/batches/{{id}}/tasks"): PRODUCTION,
    ("POST", f"{V1}/batches/{{id}}/tasks"): MANAGERS,
    ("POST", f"{V1}/batches/{{id}}/recall"): MANAGERS,
    ("GET", f"{V1}/tasks"): PRODUCTION,
    ("GET", f"{V1}/tasks/{{id}}"): PRODUCTION,
    ("GET", f"{V1}/tasks/{{id}}/config"): PRODUCTION,
    ("DELETE", f"{V1}/tasks/{{id}}"): MANAGERS,
    # Episodes.
    ("GET", f"{V1}/episodes"): QUALITY | {Role.DATA_COLLECTOR},
    ("GET", f"{V1}/episodes/{{id}}"): QUALITY | {Role.DATA_COLLECTOR},
    ("PATCH", f"{V1}/episodes/{{id}}"): QUALITY,
    ("GET", f"{V1}/episodes/{{id}}/presign"): QUALITY,
    ("GET", f"{V1}/qa/episodes/{{id}}/checks"): QUALITY | {Role.DATA_COLLECTOR},
    ("POST", f"{V1}/qa/episodes/{{id}}/run"): MANAGERS,
    ("GET", f"{V1}/inspections/queue"): INSPECTORS,
    ("POST", f"{V1}/inspections/{{id}}/claim"): INSPECTORS,
    ("POST", f"{V1}/inspections/{{id}}/approve"): INSPECTORS,
    ("POST", f"{V1}/inspections/{{id}}/reject"): INSPECTORS,
    ("GET", f"{V1}/inspections/stats"): QUALITY,
    # Cloud sync: reads for quality staff, (re)queueing for admins and managers (audited).
    ("POST", f"{V1}/sync/episodes"): MANAGERS,
    ("POST", f"{V1}/sync/episodes/{{id}}/resync"): MANAGERS,
    ("GET", f"{V1}/sync/episodes/summary"): QUALITY,
    ("GET", f"{V1}/sync/episodes/{{id}}/status"): QUALITY,
    ("GET", f"{V1}/sync/episodes/{{id}}/logs"): QUALITY,
    ("GET", f"{V1}/sync/config"): QUALITY,
    # Dashboards and data-production statistics (docs/statistics.md).
    ("GET", f"{V1}/production/dashboard/snapshot"): PRODUCTION,
    ("GET", f"{V1}/production/dashboard/overview"): PRODUCTION,
    ("GET", f"{V1}/quality/dashboard"): QUALITY,
    **{
        ("GET", f"{V1}/admin/statistics/data-production/{view}"): MANAGERS
        for view in ("summary", "trend", "breakdown", "details", "export")
    },
    **{
        ("GET", f"{V1}/operator/statistics/data-production/{view}"): frozenset(
            {Role.DATA_COLLECTOR}
        )
        for view in ("summary", "trend", "breakdown")
    },
    # Audit.
    ("GET", f"{V1}/audit"): ADMIN,
    # Alerts (raised by the alerts sensor; read-only here).
    ("GET", f"{V1}/alerts"): QUALITY,
    ("GET", f"{V1}/alerts/rules"): QUALITY,
    ("GET", f"{V1}/alerts/{{id}}"): QUALITY,
    # Webhooks: admins only (their secrets sign what leaves Keystone).
    ("GET", f"{V1}/webhooks/event-types"): ADMIN,
    ("GET", f"{V1}/webhooks"): ADMIN,
    ("POST", f"{V1}/webhooks"): ADMIN,
    ("GET", f"{V1}/webhooks/{{id}}"): ADMIN,
    ("PATCH", f"{V1}/webhooks/{{id}}"): ADMIN,
    ("DELETE", f"{V1}/webhooks/{{id}}"): ADMIN,
    ("POST", f"{V1}/webhooks/{{id}}/rotate-secret"): ADMIN,
    ("POST", f"{V1}/webhooks/{{id}}/test"): ADMIN,
    ("GET", f"{V1}/webhooks/{{id}}/deliveries"): ADMIN,
    ("GET", f"{V1}/webhooks/{{id}}/deliveries/{{delivery_id}}"): ADMIN,
    ("POST", f"{V1}/webhooks/{{id}}/deliveries/{{delivery_id}}/redeliver"): ADMIN,
}
