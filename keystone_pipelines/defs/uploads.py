"""Upload verification: re-hash stored MCAPs so the device may be sent its ``upload_ack``.

The transfer hub checks each upload's key, size, checksum metadata, sidecar and MCAP
summary as it arrives; with ``KEYSTONE_ACK_VERIFY=sha256`` the bytes themselves are then
re-hashed here — the devices upload unsigned payloads, so nothing else proves they
arrived intact. A sensor batches waiting uploads into runs (one run per batch, never per
episode); each run claims its rows with a lease, so overlapping runs share the work.
"""

# No `from __future__ import annotations` here: Dagster inspects op annotations at runtime.

import time
from datetime import timedelta

from dagster import (
    DefaultSensorStatus,
    MetadataValue,
    OpExecutionContext,
    Output,
    RunRequest,
    SensorEvaluationContext,
    SkipReason,
    job,
    op,
    sensor,
)
from sqlalchemy import func
from sqlmodel import col, select

from keystone_core.models import DeviceUpload
from keystone_core.services.uploads import claim_for_hashing, complete_hash, hash_object
from keystone_core.storage import create_s3_client
from keystone_pipelines.resources import KeystoneDatabase

BATCH = 50
LEASE = timedelta(minutes=15)


@op(description="Re-hash up to 50 checked uploads; matching ones become verified episodes.")
def verify_uploads_op(context: OpExecutionContext, database: KeystoneDatabase) -> Output[int]:
    with database.session() as session:
        claimed = [
            (row.id, row.bucket, row.s3_key, row.task_id)
            for row in claim_for_hashing(session, BATCH, LEASE)
        ]
    s3 = create_s3_client(database.settings)
    verified, failed, hashed_bytes = 0, [], 0
    started = time.monotonic()
    for upload_id, bucket, key, task_id in claimed:
        assert upload_id is not None
        assert key is not None
        try:
            digest, size = hash_object(s3, bucket, key)
            hashed_bytes += size
            error = ""
        except Exception as exc:  # unreadable object: recorded, never ACKed
            digest, error = None, f"stored object unreadable: {exc}"[:500]
        with database.session() as session:
            ok = complete_hash(session, upload_id, digest, error)
        if ok:
            verified += 1
        else:
            failed.append(task_id)
        context.log.info("%s %s", task_id, "verified" if ok else "REJECTED")
    seconds = time.monotonic() - started
    return Output(
        verified,
        metadata={
            "claimed": len(claimed),
            "verified": verified,
            "rejected": len(failed),
            "rejected_task_ids": MetadataValue.json(failed[:100]),
            "hashed_mib": round(hashed_bytes / 2**20, 1),
            "mib_per_s": round(hashed_bytes / 2**20 / seconds, 1) if seconds > 0 else 0.0,
        },
    )


@job(
    description="Re-hash stored MCAPs of checked uploads (KEYSTONE_ACK_VERIFY=sha256).",
    tags={"keystone/kind": "verification"},
)
def verify_uploads() -> None:
    verify_uploads_op()


@sensor(
    job=verify_uploads,
    minimum_interval_seconds=5,
    default_status=DefaultSensorStatus.RUNNING,
    description="One verify_uploads run per batch of checked uploads waiting for a re-hash.",
)
def pending_verification_sensor(
    context: SensorEvaluationContext, database: KeystoneDatabase
) -> RunRequest | SkipReason:
    with database.session() as session:
        waiting, newest = session.exec(
            select(func.count(), func.max(DeviceUpload.id)).where(
                col(DeviceUpload.checked_at).is_not(None),
                col(DeviceUpload.verified_at).is_(None),
                col(DeviceUpload.verify_error) == "",
            )
        ).one()
    if not waiting:
        return SkipReason("no upload waits for a re-hash")
    # One run per new high-water mark; leases keep overlapping runs apart.
    return RunRequest(run_key=f"verify-{newest}-{waiting}", tags={"keystone/waiting": str(waiting)})
