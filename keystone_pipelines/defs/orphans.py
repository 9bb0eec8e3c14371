"""Objects in the edge buckets without an episode: find them a few device prefixes per tick
and repair them through the transfer hub's checks.

A device whose ``upload_complete`` or ACK path failed leaves a recording in the bucket that
no episode points to. ``orphan_upload_sensor`` walks the prefixes of live robots
round-robin, each from its own cursor, and asks for one ``repair_orphan_uploads`` run per
batch of such keys (docs/devices.md, "Objects without an episode").
"""

# No `from __future__ import annotations` here: Dagster inspects op annotations at runtime.

import hashlib
import json
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from dagster import (
    Backoff,
    Config,
    DefaultSensorStatus,
    Failure,
    MetadataValue,
    OpExecutionContext,
    Output,
    RetryPolicy,
    RunRequest,
    SensorEvaluationContext,
    SkipReason,
    job,
    op,
    sensor,
)

from keystone_core.errors import KeystoneError
from keystone_core.services.orphans import (
    OrphanRepair,
    advance_cursor,
    drop_gone,
    find_orphans,
    outcome_counts,
    parse_cursor,
    repair_orphan,
    scan_order,
    scannable_devices,
)
from keystone_core.services.uploads import expected_prefix
from keystone_core.settings import Settings
from keystone_core.storage import create_s3_client
from keystone_pipelines.resources import KeystoneDatabase

# Device prefixes walked per tick, and a time budget so a tick ends well inside 60 s.
PREFIXES_PER_TICK = 50
TICK_BUDGET_S = 30.0
# Keys per repair run (each may be re-hashed: up to ~10 s for a 4 GB episode).
MAX_KEYS_PER_RUN = 100
OP_NAME = "repair_orphan_uploads_op"


def orphan_grace(settings: Settings) -> timedelta:
    """``KEYSTONE_ORPHAN_GRACE_MINUTES``: objects this young are left to the transfer hub."""
    return timedelta(minutes=settings.orphan_grace_minutes)


class RepairOrphanUploadsConfig(Config):
    """Object keys (in their factory's edge bucket) to repair. (Not ``keys``: Dagster
    reads a config object through ``dict()``, which a ``keys`` attribute would confuse.)"""

    object_keys: list[str]


def repair_run_config(keys: Sequence[str]) -> dict[str, Any]:
    """The run config of a ``repair_orphan_uploads`` run for ``keys``."""
    return {"ops": {OP_NAME: {"config": {"object_keys": list(keys)}}}}


def _markdown(results: Sequence[OrphanRepair]) -> str:
    def cell(text: str | None) -> str:
        return (text or "").replace("|", "\\|").replace("\n", " ")

    rows = ["| key | outcome | reason | episode |", "|---|---|---|---|"]
    rows += [
        f"| `{cell(r.key)}` | {r.outcome.value} | {cell(r.reason)} | {cell(r.episode_id)} |"
        for r in results
    ]
    return "\n".join(rows)


@op(
    name=OP_NAME,
    description="Check each orphan object like the transfer hub; good ones become episodes.",
    retry_policy=RetryPolicy(max_retries=3, delay=30, backoff=Backoff.EXPONENTIAL),
)
def repair_orphan_uploads_op(
    context: OpExecutionContext, config: RepairOrphanUploadsConfig, database: KeystoneDatabase
) -> Output[int]:
    s3 = create_s3_client(database.settings)
    results: list[OrphanRepair] = []
    errors: dict[str, str] = {}
    for key in dict.fromkeys(config.object_keys):
        try:
            # One transaction per key: a failure leaves the others' outcomes in place.
            with database.session() as session:
                result = repair_orphan(session, database.settings, s3, key)
        except (KeystoneError, BotoCoreError, ClientError) as exc:
            errors[key] = f"{type(exc).__name__}: {exc}"[:500]
            context.log.warning("repairing %s failed: %s", key, errors[key])
            continue
        results.append(result)
        context.log.info("%s %s: %s", key, result.outcome.value, result.reason)
    counts = outcome_counts(results)
    metadata: dict[str, Any] = {
        **counts,
        "errors": len(errors),
        "episode_ids": MetadataValue.json([r.episode_id for r in results if r.episode_id]),
        "results": MetadataValue.json([r.as_dict() for r in results]),
        "table": MetadataValue.md(_markdown(results)),
    }
    if errors:
        # Retried (the repair is idempotent: settled keys come back as "known").
        raise Failure(
            f"{len(errors)} of {len(config.object_keys)} keys could not be checked (object store?)",
            metadata={**metadata, "failed_keys": MetadataValue.json(errors)},
        )
    return Output(counts["repaired"], metadata=metadata)


@job(
    description="Repair objects in the edge buckets that have no episode (found by a sensor).",
    tags={"keystone/kind": "orphans"},
)
def repair_orphan_uploads() -> None:
    repair_orphan_uploads_op()


@sensor(
    job=repair_orphan_uploads,
    minimum_interval_seconds=300,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "Walks a few device prefixes of the edge buckets per tick (round-robin, one cursor "
        "each) and asks for a repair run for objects without an episode."
    ),
)
def orphan_upload_sensor(
    context: SensorEvaluationContext, database: KeystoneDatabase
) -> RunRequest | SkipReason:
    settings = database.settings
    grace = orphan_grace(settings)
    with database.session() as session:
        devices = scannable_devices(session)
    cursor = drop_gone(parse_cursor(context.cursor), devices)
    s3 = create_s3_client(settings)
    deadline = time.monotonic() + TICK_BUDGET_S
    orphans: list[str] = []
    scanned, failed = 0, 0
    for device in scan_order(devices, cursor)[:PREFIXES_PER_TICK]:
        if time.monotonic() > deadline or len(orphans) >= MAX_KEYS_PER_RUN:
            break
        prefix = expected_prefix(device)
        try:
            with database.session() as session:
                scan = find_orphans(
                    session,
                    settings,
                    s3,
                    device,
                    cursor.get(prefix, ""),
                    grace=grace,
                    max_orphans=MAX_KEYS_PER_RUN - len(orphans),
                )
        except (KeystoneError, BotoCoreError, ClientError) as exc:
            # One unreadable bucket must not stop the others: this prefix keeps its cursor
            # and goes to the back of the round.
            failed += 1
            context.log.warning("scanning %s failed: %s", prefix, exc)
            cursor = advance_cursor(cursor, prefix, cursor.get(prefix, ""))
            continue
        scanned += 1
        orphans += scan.orphans
        cursor = advance_cursor(cursor, prefix, scan.cursor)
    context.update_cursor(json.dumps(cursor, separators=(",", ":")))
    if not orphans:
        failures = f", {failed} failed" if failed else ""
        return SkipReason(
            f"scanned {scanned} of {len(devices)} device prefixes{failures}: "
            "no object without an episode"
        )
    digest = hashlib.sha256("\n".join(sorted(orphans)).encode()).hexdigest()[:24]
    factories = sorted({key.split("/", 1)[0] for key in orphans})
    return RunRequest(
        run_key=f"orphans-{digest}",
        run_config=repair_run_config(orphans),
        tags={
            "keystone/orphans": str(len(orphans)),
            "keystone/factory": ",".join(factories)[:200],
            "keystone/prefixes_scanned": str(scanned),
        },
    )
