"""Housekeeping on MariaDB + SeaweedFS: audit archival before deletion, event-history pruning."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from dagster import DagsterInstance
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.db import session_scope
from keystone_core.models import AuditLog, OutboxEvent, Webhook, WebhookAttempt, WebhookDelivery
from keystone_core.models.enums import OutboxStatus, WebhookDeliveryStatus
from keystone_core.services.housekeeping import (
    audit_row_dict,
    read_archive,
    run_housekeeping,
)
from keystone_core.settings import Settings
from keystone_core.storage import EmbeddedS3Server, create_s3_client
from tests.conftest import make_settings

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)
Sessions = Callable[[], AbstractContextManager[Session]]


@pytest.fixture
def sessions(mariadb_engine: Engine) -> Sessions:
    return lambda: session_scope(mariadb_engine)


def settings_for(
    tmp_path: Path, engine: Engine, s3: EmbeddedS3Server, **overrides: object
) -> Settings:
    return make_settings(
        tmp_path,
        database_url=engine.url.render_as_string(hide_password=False),
        s3_endpoint_url=s3.endpoint_url,
        s3_access_key=s3.access_key,
        s3_secret_key=s3.secret_key,
        audit_archive_bucket=f"audit-{tmp_path.name.lower().replace('_', '-')}"[:60].rstrip("-"),
        **overrides,
    )


def add_audit(sessions: Sessions, days_ago: float, count: int) -> None:
    with sessions() as session:
        for i in range(count):
            session.add(
                AuditLog(
                    occurred_at=NOW - dt.timedelta(days=days_ago, microseconds=i),
                    actor_type="user",
                    actor_id="7",
                    actor_account="alice",
                    action="episode.update",
                    entity_type="episode",
                    entity_id=str(i),
                    before={"status": "pending_qa"},
                    after={"status": "approved", "note": "ünïcode"},
                    request_id=f"req-{days_ago}-{i}",
                )
            )


def audit_rows(sessions: Sessions) -> list[dict[str, Any]]:
    with sessions() as session:
        rows = session.exec(select(AuditLog).order_by(col(AuditLog.id))).all()
        return [audit_row_dict(r) for r in rows]


def test_old_audit_rows_are_archived_then_deleted(
    sessions: Sessions, mariadb_engine: Engine, s3_server: EmbeddedS3Server, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, mariadb_engine, s3_server, audit_retention_days=365)
    add_audit(sessions, 400, 7)
    add_audit(sessions, 10, 3)
    before = audit_rows(sessions)
    old = [r for r in before if r["request_id"].startswith("req-400")]

    with clock.frozen(NOW):
        dry = run_housekeeping(sessions, create_s3_client(settings), settings, dry_run=True)
        assert (dry.audit_candidates, dry.audit_deleted) == (7, 0)
        assert audit_rows(sessions) == before
        report = run_housekeeping(sessions, create_s3_client(settings), settings)

    assert report.errors == []
    assert (report.audit_archived, report.audit_deleted) == (7, 7)
    kept = audit_rows(sessions)
    assert [r["request_id"] for r in kept[:3]] == [r["request_id"] for r in before[7:]]
    # One more row: what housekeeping itself did.
    assert kept[-1]["action"] == "housekeeping.pruned"
    assert kept[-1]["after"]["audit_deleted"] == 7

    client = create_s3_client(settings)
    (key,) = report.archive_keys
    assert key.startswith("audit/2025/")
    body = client.get_object(Bucket=settings.audit_archive_bucket, Key=key)["Body"].read()
    assert read_archive(body) == old  # every column, microseconds and JSON intact


def test_a_failed_upload_deletes_nothing_and_the_rerun_archives_again(
    sessions: Sessions,
    mariadb_engine: Engine,
    s3_server: EmbeddedS3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(tmp_path, mariadb_engine, s3_server, audit_retention_days=30)
    add_audit(sessions, 40, 5)
    before = audit_rows(sessions)
    client = create_s3_client(settings)

    def refuse(**_: object) -> None:
        raise ClientError({"Error": {"Code": "InternalError", "Message": "disk full"}}, "PutObject")

    with clock.frozen(NOW):
        monkeypatch.setattr(client, "put_object", refuse)
        failed = run_housekeeping(sessions, client, settings)
        assert failed.errors
        assert "disk full" in failed.errors[0]
        assert audit_rows(sessions) == before
        monkeypatch.undo()

        # A crash after the upload, before the delete: the rows are still there...
        again = create_s3_client(settings)
        monkeypatch.setattr(
            "keystone_core.services.housekeeping.delete",
            lambda *_a, **_k: (_ for _ in ()).throw(OSError("killed before the delete")),
        )
        crashed = run_housekeeping(sessions, again, settings)
        assert audit_rows(sessions) == before
        monkeypatch.undo()
        assert crashed.archive_keys  # uploaded
        # ... and the next run writes the same archive (same key, same bytes) and deletes.
        done = run_housekeeping(sessions, again, settings)
    assert done.archive_keys == crashed.archive_keys
    assert done.audit_deleted == 5
    body = again.get_object(Bucket=settings.audit_archive_bucket, Key=done.archive_keys[0])
    assert read_archive(body["Body"].read()) == before


def test_retention_off_keeps_everything_and_no_archive_deletes_without_copy(
    sessions: Sessions, mariadb_engine: Engine, s3_server: EmbeddedS3Server, tmp_path: Path
) -> None:
    add_audit(sessions, 4000, 3)
    off = settings_for(tmp_path, mariadb_engine, s3_server, audit_retention_days=None)
    with clock.frozen(NOW):
        report = run_housekeeping(sessions, create_s3_client(off), off)
    assert report.audit_candidates == 0
    assert len(audit_rows(sessions)) == 3

    no_copy = settings_for(
        tmp_path, mariadb_engine, s3_server, audit_retention_days=30, audit_archive=False
    )
    with clock.frozen(NOW):
        report = run_housekeeping(sessions, None, no_copy)
    assert (report.audit_deleted, report.archive_keys) == (3, [])


def add_event(
    session: Session, webhook: Webhook, days_ago: float, deliveries: list[WebhookDeliveryStatus]
) -> int:
    at = NOW - dt.timedelta(days=days_ago)
    event = OutboxEvent(
        event_type="episode.approved",
        payload={"episode_id": "e"},
        status=OutboxStatus.DELIVERED,
        delivered_at=at,
    )
    session.add(event)
    session.flush()
    for status in deliveries:
        delivery = WebhookDelivery(
            webhook_id=webhook.id,  # type: ignore[arg-type]
            event_id=event.id,  # type: ignore[arg-type]
            event_type=event.event_type,
            status=status,
        )
        session.add(delivery)
        session.flush()
        session.add(
            WebhookAttempt(delivery_id=delivery.id, attempt_no=1, started_at=at)  # type: ignore[arg-type]
        )
        # One delivery per webhook and event (unique): the next one goes to another webhook.
        webhook = Webhook(url="https://example.invalid/hook2", secret="s" * 32)
        session.add(webhook)
        session.flush()
    assert event.id is not None
    return event.id


def test_event_history_is_pruned_only_when_finished_and_old(
    sessions: Sessions, mariadb_engine: Engine, s3_server: EmbeddedS3Server, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, mariadb_engine, s3_server, outbox_retention_days=14)
    with sessions() as session:
        webhook = Webhook(url="https://example.invalid/hook", secret="s" * 32)
        session.add(webhook)
        session.flush()
        done = add_event(
            session, webhook, 20, [WebhookDeliveryStatus.DELIVERED, WebhookDeliveryStatus.FAILED]
        )
        no_subscriber = add_event(session, webhook, 20, [])
        retrying = add_event(
            session,
            webhook,
            20,
            [WebhookDeliveryStatus.DELIVERED, WebhookDeliveryStatus.RETRY_WAIT],
        )
        recent = add_event(session, webhook, 3, [WebhookDeliveryStatus.DELIVERED])
        pending = OutboxEvent(event_type="episode.approved", payload={})  # not fanned out
        session.add(pending)
        session.flush()
        pending_id = pending.id

    with clock.frozen(NOW):
        dry = run_housekeeping(sessions, None, settings, dry_run=True)
        assert dry.outbox_candidates == 2
        report = run_housekeeping(sessions, None, settings)
    assert (report.events_deleted, report.deliveries_deleted, report.attempts_deleted) == (2, 2, 2)
    with sessions() as session:
        left = set(session.exec(select(OutboxEvent.id)))
        deliveries = session.exec(select(func.count()).select_from(WebhookDelivery)).one()
        attempts = session.exec(select(func.count()).select_from(WebhookAttempt)).one()
    assert left == {retrying, recent, pending_id}
    assert done not in left
    assert no_subscriber not in left
    assert (deliveries, attempts) == (3, 3)


def test_the_dagster_job_runs_housekeeping(
    sessions: Sessions,
    mariadb_engine: Engine,
    s3_server: EmbeddedS3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from keystone_pipelines.defs.housekeeping import housekeeping
    from keystone_pipelines.resources import KeystoneDatabase, KeystoneObjectStore

    settings = settings_for(tmp_path, mariadb_engine, s3_server)
    monkeypatch.setenv("KEYSTONE_AUDIT_ARCHIVE_BUCKET", settings.audit_archive_bucket)
    add_audit(sessions, 400, 4)
    resources = {
        "database": KeystoneDatabase(
            database_url=settings.database_url,
            s3_endpoint_url=s3_server.endpoint_url,
            s3_access_key=s3_server.access_key,
            s3_secret_key=s3_server.secret_key,
        ),
        "object_store": KeystoneObjectStore(
            endpoint_url=s3_server.endpoint_url,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
        ),
    }
    with clock.frozen(NOW), DagsterInstance.ephemeral() as instance:
        result = housekeeping.execute_in_process(instance=instance, resources=resources)
    assert result.success
    assert result.output_for_node("housekeeping_op") == 4
    with sessions() as session:
        actions = list(session.exec(select(AuditLog.action)))
    assert actions == ["housekeeping.pruned"]
