"""The Dagster daemon's heartbeat, read by ``/api/v1/health`` (component ``dagster_daemon``).

``keystone_heartbeat_sensor`` launches nothing: each tick writes the ``component_heartbeats``
row ``dagster_daemon`` (``beat_at`` from Keystone's clock; host, process and code location
in ``detail``). A fresh row shows that the daemon ticks sensors, that it loads this code
location and that the code location reaches Keystone's database — what "Dagster is up"
has to mean for QA and sync to happen. The API calls the daemon down when the row is older
than ``KEYSTONE_DAGSTER_HEARTBEAT_MAX_AGE_S`` (180 s by default, six ticks).
"""

# No `from __future__ import annotations` here: Dagster inspects annotations at runtime.

import os
import socket

import dagster
from dagster import DefaultSensorStatus, SensorEvaluationContext, SkipReason
from dagster import sensor as dagster_sensor

from keystone_core.services.heartbeats import DAGSTER_DAEMON, record_heartbeat
from keystone_pipelines.resources import KeystoneDatabase

HEARTBEAT_INTERVAL_S = 30
CODE_LOCATION = "keystone_pipelines"


def heartbeat_detail(context: SensorEvaluationContext) -> dict[str, str | int]:
    """Where the beat came from (the process that evaluates the sensor for the daemon)."""
    origin = context.code_location_origin
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "code_location": origin.location_name if origin is not None else CODE_LOCATION,
        "dagster_version": dagster.__version__,
    }


@dagster_sensor(
    minimum_interval_seconds=HEARTBEAT_INTERVAL_S,
    default_status=DefaultSensorStatus.RUNNING,
    description="Write the Dagster daemon's heartbeat for /api/v1/health (launches no runs).",
)
def keystone_heartbeat_sensor(
    context: SensorEvaluationContext, database: KeystoneDatabase
) -> SkipReason:
    with database.session() as session:
        beat = record_heartbeat(session, DAGSTER_DAEMON, heartbeat_detail(context))
        beat_at = beat.beat_at
    return SkipReason(f"heartbeat written at {beat_at.isoformat()}")
