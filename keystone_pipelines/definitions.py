"""The code location ``keystone_pipelines`` loaded by Dagster (see workspace.yaml)."""

from __future__ import annotations

from dagster import Definitions, in_process_executor

from keystone_pipelines.defs.alerts import alerts_sensor
from keystone_pipelines.defs.health import keystone_heartbeat_sensor
from keystone_pipelines.defs.housekeeping import housekeeping, housekeeping_schedule
from keystone_pipelines.defs.maintenance import (
    prune_device_feed,
    prune_device_feed_schedule,
    release_expired_leases,
    release_expired_leases_schedule,
)
from keystone_pipelines.defs.orphans import orphan_upload_sensor, repair_orphan_uploads
from keystone_pipelines.defs.qa import episode_qa, pending_qa_sensor, qa_batch, qa_rerun
from keystone_pipelines.defs.run_history import purge_run_history, purge_run_history_schedule
from keystone_pipelines.defs.sync import (
    cloud_sync,
    due_sync_sensor,
    edge_retention,
    edge_retention_schedule,
    resync,
    sync_batch,
    sync_safety_schedule,
)
from keystone_pipelines.defs.uploads import pending_verification_sensor, verify_uploads
from keystone_pipelines.defs.webhooks import (
    deliver_webhooks,
    outbox_safety_schedule,
    outbox_sensor,
)
from keystone_pipelines.resources import KeystoneDatabase, KeystoneObjectStore

defs = Definitions(
    assets=[episode_qa, cloud_sync],
    jobs=[
        release_expired_leases,
        prune_device_feed,
        verify_uploads,
        qa_batch,
        qa_rerun,
        repair_orphan_uploads,
        sync_batch,
        resync,
        edge_retention,
        deliver_webhooks,
        purge_run_history,
        housekeeping,
    ],
    sensors=[
        keystone_heartbeat_sensor,
        alerts_sensor,
        pending_verification_sensor,
        pending_qa_sensor,
        orphan_upload_sensor,
        due_sync_sensor,
        outbox_sensor,
    ],
    schedules=[
        release_expired_leases_schedule,
        prune_device_feed_schedule,
        sync_safety_schedule,
        edge_retention_schedule,
        outbox_safety_schedule,
        purge_run_history_schedule,
        housekeeping_schedule,
    ],
    resources={"database": KeystoneDatabase(), "object_store": KeystoneObjectStore()},
    # Every job here is one op (or one asset) that parallelises inside itself; a process
    # per step would only add a second interpreter start (~6 s of imports) to each run.
    executor=in_process_executor,
)
