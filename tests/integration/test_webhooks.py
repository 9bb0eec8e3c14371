"""Webhooks on MariaDB against a real HTTP receiver: events written with the change (and
not after a rollback), fan-out by type and factory (idempotent, racing claimers deliver
each once), HMAC signatures with a timestamp, retries with backoff on a moved clock, the
attempt budget, redirects, timeouts, auto-disable and re-enable, the Dagster sensor and
job, and every bad input of the API."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    RunRequest,
    SensorResult,
    SkipReason,
    build_schedule_context,
    build_sensor_context,
    instance_for_test,
)
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from keystone_api.app import create_app
from keystone_core import clock
from keystone_core.db import session_scope
from keystone_core.errors import ConflictError
from keystone_core.models import (
    AuditLog,
    Episode,
    EpisodeStatus,
    OutboxEvent,
    OutboxStatus,
    Role,
    Task,
    TaskStatus,
    User,
    UserFactory,
    Webhook,
    WebhookAttempt,
    WebhookDelivery,
    WebhookDeliveryStatus,
)
from keystone_core.qa.checks import Check
from keystone_core.qa.run import Report
from keystone_core.request_context import bound_request_id
from keystone_core.security import hash_password, issue_access_token
from keystone_core.services import qa as qa_service
from keystone_core.services import webhooks as svc
from keystone_core.services.audit import Actor
from keystone_core.services.device_tasks import advance_task
from keystone_core.services.outbox import EventType, emit
from keystone_core.services.scope import Scope
from keystone_core.settings import Settings
from keystone_core.webhooks.signing import SignatureError, verify_signature
from keystone_pipelines.definitions import defs
from keystone_pipelines.defs.webhooks import (
    deliver_webhooks,
    outbox_safety_schedule,
    outbox_sensor,
)
from keystone_pipelines.resources import KeystoneDatabase
from tests.conftest import make_settings
from tests.factories import make_episode, make_factory, make_order, make_task
from tests.integration.test_rbac_matrix import app_settings  # noqa: F401

pytestmark = pytest.mark.integration

V1 = "/api/v1/webhooks"
ADMIN = Actor(type="user", id="1", account="tester", role="admin")
EVERYTHING = Scope.everything()
# Real "now" (tokens are checked against it), frozen so tests can move it.
T0 = dt.datetime.now(dt.UTC).replace(microsecond=0)

# --- a real HTTP receiver ------------------------------------------------------------------

Action = int | str | Callable[[], int]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A threaded HTTP server that records every request and answers by plan, else by path,
    else the default: a status code, ``"hang"`` (no answer until the test ends) or a
    function returning a status."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.plan: list[Action] = []
        self.routes: dict[str, Action] = {}  # by path, when the plan is empty
        self.default: Action = 200
        self.release = threading.Event()
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                owner.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        with self.lock:
            self.received.append(
                Received(request.path, {k.lower(): v for k, v in request.headers.items()}, body)
            )
            action = self.plan.pop(0) if self.plan else self.routes.get(request.path, self.default)
        if action == "hang":
            self.release.wait(60)
            request.close_connection = True
            return
        status = action() if callable(action) else int(action)
        payload = b"thanks" if status < 300 else b"no good " * 200  # > 1 KiB
        request.send_response(status)
        if 300 <= status < 400:
            request.send_header("Location", self.url("/elsewhere"))
        request.send_header("Content-Type", "text/plain")
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        request.wfile.write(payload)

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


@pytest.fixture
def hook_settings(tmp_path: Path, mariadb_migrated: str) -> Settings:
    return make_settings(
        tmp_path,
        database_url=mariadb_migrated,
        webhook_timeout_s=5.0,
        webhook_backoff_base_s=10.0,
        webhook_backoff_cap_s=300.0,
        webhook_max_attempts=5,
        webhook_disable_after=50,
        webhook_workers=4,
        webhook_batch_max=100,
    )


# --- helpers -------------------------------------------------------------------------------


def scope_of(engine: Engine) -> Callable[[], Any]:
    return lambda: session_scope(engine)


def add_hook(
    engine: Engine,
    url: str,
    *,
    event_types: tuple[str, ...] = ("*",),
    factory_id: int | None = None,
) -> tuple[int, str]:
    with session_scope(engine) as session:
        hook = svc.create_webhook(
            session, EVERYTHING, ADMIN, url=url, event_types=event_types, factory_id=factory_id
        )
        assert hook.id is not None
        return hook.id, hook.secret


def add_event(
    engine: Engine,
    event_type: str = "order.completed",
    *,
    factory_id: int | None = None,
    request_id: str | None = None,
    **payload: Any,
) -> int:
    with session_scope(engine) as session:
        event = emit(
            session,
            event_type,
            payload or {"order_id": "7"},
            factory_id=factory_id,
            request_id=request_id,
        )
        session.flush()
        assert event.id is not None
        return event.id


def run(engine: Engine, settings: Settings, owner: str = "run-1") -> svc.DeliveryOutcome:
    return svc.deliver_pending(scope_of(engine), settings, owner=owner, budget_s=60)


def deliveries(engine: Engine, webhook_id: int | None = None) -> list[WebhookDelivery]:
    with Session(engine) as session:
        query = select(WebhookDelivery).order_by(col(WebhookDelivery.id))
        if webhook_id is not None:
            query = query.where(col(WebhookDelivery.webhook_id) == webhook_id)
        return list(session.exec(query).all())


def attempts(engine: Engine, delivery_id: int) -> list[WebhookAttempt]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(WebhookAttempt)
                .where(col(WebhookAttempt.delivery_id) == delivery_id)
                .order_by(col(WebhookAttempt.id))
            ).all()
        )


def hook_row(engine: Engine, webhook_id: int) -> Webhook:
    with Session(engine) as session:
        row = session.get(Webhook, webhook_id)
        assert row is not None
        return row


def outbox(engine: Engine) -> list[OutboxEvent]:
    with Session(engine) as session:
        return list(session.exec(select(OutboxEvent).order_by(col(OutboxEvent.id))).all())


def counter(event_type: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "keystone_webhook_deliveries_total", {"event_type": event_type, "outcome": outcome}
    )
    return value or 0.0


# --- events written with the change --------------------------------------------------------


def _report(verdict: str, score: float, *failing: str) -> Report:
    checks = [Check(name, False, 1, 0, f"{name} failed", weight=1.0) for name in failing]
    checks.append(Check("structure", True, "ok", "ok", "readable", weight=1.0))
    return Report(
        source="s3://edge/x.mcap",
        tier="fast",
        score=score,
        verdict=verdict,
        hard_failure=verdict == "qa_failed",
        checks=checks,
    )


def test_domain_changes_write_their_events_in_their_own_transaction(
    mariadb_engine: Engine, hook_settings: Settings
) -> None:
    with Session(mariadb_engine, expire_on_commit=False) as session:
        factory = make_factory(session)
        order = make_order(session, factory_id=factory.id, target_count=1, status="in_progress")
        running = {
            verdict: make_episode(
                session,
                factory_id=factory.id,
                order_id=order.id,
                status=EpisodeStatus.QA_RUNNING,
                qa_lease_owner="qa-run",
                qa_request_id=f"req-{verdict}",
            ).id
            for verdict in ("needs_inspection", "qa_failed", "auto_approved")
        }
        task = make_task(session, factory_id=factory.id, status=TaskStatus.UPLOADING)
        session.commit()
    # A verdict that is rolled back leaves no event behind.
    with Session(mariadb_engine) as session:
        episode_id = running["auto_approved"]
        assert episode_id is not None
        assert qa_service.record(
            session, episode_id, _report("auto_approved", 0.97), owner="qa-run", sync_target=None
        )
        assert {e.event_type for e in session.exec(select(OutboxEvent)).all()} == {
            "episode.approved",
            "order.completed",
        }
        session.rollback()
    assert outbox(mariadb_engine) == []
    # Committed: one event per verdict, the approval completes the order (target 1).
    reports = {
        "needs_inspection": _report("needs_inspection", 0.7, "message_gaps"),
        "qa_failed": _report("qa_failed", 0.1, "structure_crc", "required_topics"),
        "auto_approved": _report("auto_approved", 0.97),
    }
    for verdict, report in reports.items():
        with session_scope(mariadb_engine) as session:
            pk = running[verdict]
            assert pk is not None
            assert qa_service.record(session, pk, report, owner="qa-run", sync_target=None)
    with session_scope(mariadb_engine) as session:
        refreshed = session.get(Task, task.id)
        assert refreshed is not None
        advance_task(session, refreshed, TaskStatus.COMPLETED, upload_acked_at=clock.now())
    events = {e.event_type: e for e in outbox(mariadb_engine)}
    assert set(events) == {
        "episode.needs_inspection",
        "episode.qa_failed",
        "episode.approved",
        "order.completed",
        "task.completed",
    }
    needs = events["episode.needs_inspection"]
    assert needs.factory_id == factory.id
    assert needs.request_id == "req-needs_inspection"  # the request that asked for QA
    assert needs.payload["status"] == "needs_inspection"
    assert needs.payload["failing_checks"] == ["message_gaps"]
    assert needs.payload["episode_row_id"] == str(running["needs_inspection"])
    assert needs.payload["qa_score"] == 0.7
    failed = events["episode.qa_failed"].payload
    assert failed["hard_failure"] is True
    assert failed["failing_checks"] == ["structure_crc", "required_topics"]
    approved = events["episode.approved"].payload
    assert approved["status"] == "auto_approved"
    assert approved["approved_at"] is not None
    assert dt.datetime.fromisoformat(approved["approved_at"]).utcoffset() == dt.timedelta(0)
    completed = events["order.completed"].payload
    assert completed == {
        **completed,
        "order_id": str(order.id),
        "status": "completed",
        "approved_count": 1,
        "target_count": 1,
    }
    done = events["task.completed"].payload
    assert done["task_id"] == task.task_id
    assert done["status"] == "completed"
    assert done["completed_at"] is not None
    assert all(len(json.dumps(e.payload)) < 1024 for e in events.values())
    # A repeated signal does not complete the task (or write its event) twice.
    with session_scope(mariadb_engine) as session:
        again = session.get(Task, task.id)
        assert again is not None
        assert not advance_task(session, again, TaskStatus.COMPLETED).changed
    assert len(outbox(mariadb_engine)) == len(events)


def test_emit_refuses_unknown_types_and_oversized_or_non_json_payloads(
    mariadb_engine: Engine,
) -> None:
    with Session(mariadb_engine) as session:
        with pytest.raises(ValueError, match="not a valid EventType"):
            emit(session, "episode.exploded", {}, factory_id=None)
        with pytest.raises(ValueError, match="limit"):
            emit(session, EventType.ALERT_RAISED, {"blob": "x" * 20_000}, factory_id=None)
        with pytest.raises(TypeError, match="JSON"):
            emit(session, EventType.ALERT_RAISED, {"when": dt.date(2026, 1, 1)}, factory_id=None)
        with bound_request_id("req-42"):
            event = emit(session, EventType.ALERT_RAISED, {"alert": "x"}, factory_id=None)
        assert event.request_id == "req-42"
        session.rollback()
    assert outbox(mariadb_engine) == []


# --- fan-out -------------------------------------------------------------------------------


def test_fan_out_filters_by_type_and_factory_and_is_idempotent(
    mariadb_engine: Engine, hook_settings: Settings, receiver: Receiver
) -> None:
    with Session(mariadb_engine) as session:
        a, b = make_factory(session).id, make_factory(session).id
        session.commit()
    everything, _ = add_hook(mariadb_engine, receiver.url("/all"))
    a_approved, _ = add_hook(
        mariadb_engine, receiver.url("/a"), event_types=("episode.approved",), factory_id=a
    )
    b_all, _ = add_hook(mariadb_engine, receiver.url("/b"), factory_id=b)
    rejected, _ = add_hook(
        mariadb_engine, receiver.url("/rej"), event_types=("episode.rejected", "alert.raised")
    )
    off, _ = add_hook(mariadb_engine, receiver.url("/off"))
    with session_scope(mariadb_engine) as session:
        svc.update_webhook(session, EVERYTHING, ADMIN, off, {"is_active": False})
    approved_a = add_event(mariadb_engine, "episode.approved", factory_id=a)
    approved_b = add_event(mariadb_engine, "episode.approved", factory_id=b)
    rejected_a = add_event(mariadb_engine, "episode.rejected", factory_id=a)
    global_alert = add_event(mariadb_engine, "alert.raised", alert="daemon_down")
    with session_scope(mariadb_engine) as session:
        first = svc.fan_out(session, limit=100)
    assert (first.events, first.deliveries) == (4, 8)
    made = {(d.webhook_id, d.event_id) for d in deliveries(mariadb_engine)}
    assert made == {
        *((everything, e) for e in (approved_a, approved_b, rejected_a, global_alert)),
        (a_approved, approved_a),
        (b_all, approved_b),
        (rejected, rejected_a),
        (rejected, global_alert),
    }
    assert {e.status for e in outbox(mariadb_engine)} == {OutboxStatus.DELIVERED}
    # Again: nothing pending. Even an event put back to pending (a crash between the
    # deliveries and the mark) makes no second delivery.
    with session_scope(mariadb_engine) as session:
        assert svc.fan_out(session, limit=100).events == 0
        session.execute(
            update(OutboxEvent)
            .where(col(OutboxEvent.id) == approved_a)
            .values(status=OutboxStatus.PENDING.value)
        )
    with session_scope(mariadb_engine) as session:
        assert svc.fan_out(session, limit=100) == svc.FanOut(events=1, deliveries=0)
    assert len(deliveries(mariadb_engine)) == 8
    # Delivered once each, each to its own endpoint; the disabled webhook got nothing.
    outcome = run(mariadb_engine, hook_settings)
    assert outcome.delivered == 8
    assert Counter(r.path for r in receiver.received) == {"/all": 4, "/a": 1, "/b": 1, "/rej": 2}


def test_two_racing_claimers_deliver_each_delivery_once(
    mariadb_engine: Engine, hook_settings: Settings, receiver: Receiver
) -> None:
    hooks = [add_hook(mariadb_engine, receiver.url(f"/h{i}"))[0] for i in range(3)]
    for i in range(15):
        add_event(mariadb_engine, order_id=str(i))
    with session_scope(mariadb_engine) as session:
        assert svc.fan_out(session, limit=100).deliveries == 45
    barrier = threading.Barrier(2, timeout=60)
    outcomes: dict[str, list[svc.DeliveryOutcome]] = {"run-a": [], "run-b": []}
    errors: list[BaseException] = []

    def racer(owner: str) -> None:
        try:
            barrier.wait()
            while True:
                with session_scope(mariadb_engine) as session:
                    works = svc.claim(session, hook_settings, owner=owner, limit=4)
                if not works:
                    return
                outcomes[owner].append(
                    svc.deliver_batch(
                        works,
                        settings=hook_settings,
                        session_scope=scope_of(mariadb_engine),
                        owner=owner,
                    )
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=racer, args=(owner,)) for owner in outcomes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    sent = Counter(r.headers["x-keystone-delivery"] for r in receiver.received)
    assert len(sent) == 45
    assert set(sent.values()) == {1}
    assert all(outcomes.values()), "both claimers took part"
    assert sum(o.delivered for runs in outcomes.values() for o in runs) == 45
    assert {d.status for d in deliveries(mariadb_engine)} == {WebhookDeliveryStatus.DELIVERED}
    assert {d.webhook_id for d in deliveries(mariadb_engine)} == set(hooks)


# --- signatures and headers ----------------------------------------------------------------


def test_signed_with_the_secret_shown_at_create_and_a_rotated_one_from_then_on(
    mariadb_engine: Engine, hook_settings: Settings, receiver: Receiver
) -> None:
    with clock.frozen(T0):
        hook, secret = add_hook(mariadb_engine, receiver.url())
        event_id = add_event(mariadb_engine, "alert.raised", request_id="req-abc", alert="x")
        run(mariadb_engine, hook_settings)
    [got] = receiver.received
    delivery = deliveries(mariadb_engine)[0]
    assert got.headers["x-keystone-event"] == "alert.raised"
    assert got.headers["x-keystone-delivery"] == str(delivery.id)
    assert got.headers["x-request-id"] == "req-abc"
    assert got.headers["user-agent"].startswith("Keystone-Webhooks/")
    assert got.headers["content-type"] == "application/json"
    body = json.loads(got.body)
    assert body == {
        "id": str(event_id),
        "type": "alert.raised",
        "created_at": T0.isoformat(),
        "factory_id": None,
        "data": {"alert": "x"},
    }
    signature = got.headers["x-keystone-signature"]
    now = T0.timestamp()
    assert verify_signature(secret, signature, got.body, now=now) == int(now)
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature(secret + "x", signature, got.body, now=now)
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature(secret, signature, got.body.replace(b'"x"', b'"y"'), now=now)
    # The timestamp is part of the signature: outside the tolerance it is refused.
    assert verify_signature(secret, signature, got.body, now=now + 299) == int(now)
    with pytest.raises(SignatureError, match="tolerance"):
        verify_signature(secret, signature, got.body, now=now + 301)
    # A rotated secret signs every try from then on; the old one no longer verifies.
    with session_scope(mariadb_engine) as session:
        rotated = svc.rotate_secret(session, EVERYTHING, ADMIN, hook).secret
    assert rotated != secret
    assert rotated.startswith("whsec_")
    add_event(mariadb_engine, "alert.raised", alert="y")
    run(mariadb_engine, hook_settings)
    latest = receiver.received[-1]
    verify_signature(rotated, latest.headers["x-keystone-signature"], latest.body)
    with pytest.raises(SignatureError):
        verify_signature(secret, latest.headers["x-keystone-signature"], latest.body)
    assert "x-request-id" not in latest.headers  # that event had no request


# --- retries, budget, redirects, timeouts --------------------------------------------------


def test_retries_back_off_on_the_clock_until_the_endpoint_answers(
    mariadb_engine: Engine, hook_settings: Settings, receiver: Receiver
) -> None:
    receiver.plan = [500, 503]
    before = counter("order.completed", "retry")
    with clock.frozen(T0) as move:
        hook, _ = add_hook(mariadb_engine, receiver.url())
        add_event(mariadb_engine)
        assert run(mariadb_engine, hook_settings).retry == 1
        [delivery] = deliveries(mariadb_engine)
        assert delivery.status == WebhookDeliveryStatus.RETRY_WAIT
        assert delivery.next_attempt_at is not None
        first_wait = (clock.as_utc(delivery.next_attempt_at) - T0).total_seconds()
        assert 5.0 <= first_wait <= 10.0  # base 10 s with jitter in [0.5, 1]
        # Not due yet: a run now sends nothing.
        assert run(mariadb_engine, hook_settings).claimed == 0
        assert len(receiver.received) == 1
        move(clock.as_utc(delivery.next_attempt_at))
        assert run(mariadb_engine, hook_settings).retry == 1
        [delivery] = deliveries(mariadb_engine)
        assert delivery.next_attempt_at is not None
        second_wait = (clock.as_utc(delivery.next_attempt_at) - clock.now()).total_seconds()
        assert 10.0 <= second_wait <= 20.0  # doubled
        assert hook_row(mariadb_engine, hook).consecutive_failures == 2
        move(clock.as_utc(delivery.next_attempt_at))
        assert run(mariadb_engine, hook_settings).delivered == 1
    [delivery] = deliveries(mariadb_engine)
    assert delivery.status == WebhookDeliveryStatus.DELIVERED
    assert delivery.attempts == 3
    assert delivery.response_status == 200
    assert delivery.delivered_at is not None
    log = attempts(mariadb_engine, delivery.id or 0)
    assert [(a.attempt_no, a.response_status, a.success) for a in log] == [
        (1, 500, False),
        (2, 503, False),
        (3, 200, True),
    ]
    assert log[0].error == "HTTP 500"
    assert len(log[0].response_body) == 1024  # the first KiB of the answer
    assert log[2].response_body == "thanks"
    assert all(a.duration_ms is not None and a.run_id == "run-1" for a in log)
    # Same delivery id (the receiver's idempotency key) and the same bytes every time.
    assert {r.headers["x-keystone-delivery"] for r in receiver.received} == {str(delivery.id)}
    assert len({r.body for r in receiver.received}) == 1
    row = hook_row(mariadb_engine, hook)
    assert row.consecutive_failures == 0
    assert row.last_success_at is not None
    assert counter("order.completed", "retry") == before + 2


def test_a_delivery_fails_after_its_budget_and_can_be_redelivered(
    mariadb_engine: Engine, hook_settings: Settings, receiver: Receiver
) -> None:
    settings = hook_settings.model_copy(update={"webhook_max_attempts": 3})
    receiver.default = 500
    failed_before = counter("order.completed", "failed")
    with clock.frozen(T0) as move:
        hook, _ = add_hook(mariadb_engine, receiver.url())
        add_event(mariadb_engine)
        for _ in range(3):
            run(mariadb_engine, settings)
            move(clock.now() + dt.timedelta(hours=1))
        assert run(mariadb_engine, settings).claimed == 0  # failed: never tried again
    [delivery] = deliveries(mariadb_engine)
    assert delivery.status == WebhookDeliveryStatus.FAILED
    assert delivery.attempts == 3
    assert delivery.last_error == "HTTP 500"
    assert len(receiver.received) == 3
    assert counter("order.completed", "failed") == failed_before + 1
    # Redelivered: a fresh budget; the attempt log keeps counting.
    receiver.default = 204
    with session_scope(mariadb_engine) as session:
        again = svc.redeliver(session, EVERYTHING, ADMIN, hook, delivery.id or 0)
        assert again.status == WebhookDeliveryStatus.PENDING
    with session_scope(mariadb_engine) as session, pytest.raises(ConflictError) as refused:
        svc.redeliver(session, EVERYTHING, ADMIN, hook, delivery.id or 0)
    assert refused.value.code == "delivery_pending"
    assert run(mariadb_engine, settings).delivered == 1
    log = attempts(mariadb_engine, delivery.id or 0)
    assert [a.attempt_no for a in log] == [1, 2, 3, 4]
    assert log[-1].response_status == 204


def test_redirects_are_not_followed_and_a_hanging_endpoint_times_out(
    mariadb_engine: Engine, hook_settings: Settings, receiver: Receiver
) -> None:
    settings = hook_settings.model_copy(update={"webhook_timeout_s": 0.5})
    redirected, _ = add_hook(mariadb_engine, receiver.url("/moved"))
    hanging, _ = add_hook(mariadb_engine, receiver.url("/hang"))
    receiver.routes = {"/moved": 302, "/hang": "hang"}
    add_event(mariadb_engine)
    outcome = run(mariadb_engine, settings)
    assert outcome.retry == 2
    by_hook = {d.webhook_id: d for d in deliveries(mariadb_engine)}
    moved = attempts(mariadb_engine, by_hook[redirected].id or 0)[0]
    assert moved.response_status == 302
    assert "redirect" in moved.error
    assert "not followed" in moved.error
    timed_out = attempts(mariadb_engine, by_hook[hanging].id or 0)[0]
    assert timed_out.response_status is None
    assert timed_out.error.startswith("timeout")
    assert by_hook[hanging].status == WebhookDeliveryStatus.RETRY_WAIT
    assert sorted(r.path for r in receiver.received) == ["/hang", "/moved"]  # no /elsewhere


def test_a_slow_endpoint_does_not_hold_up_the_others(
    mariadb_engine: Engine, hook_settings: Settings, receiver: Receiver
) -> None:
    settings = hook_settings.model_copy(update={"webhook_timeout_s": 3.0})
    fast_seen = threading.Event()

    def slow() -> int:
        # Answers only once the other endpoint was called: if deliveries went one after
        # the other, this one would time out first.
        return 200 if fast_seen.wait(10) else 500

    def fast() -> int:
        fast_seen.set()
        return 200

    add_hook(mariadb_engine, receiver.url("/slow"))
    add_hook(mariadb_engine, receiver.url("/fast"))
    receiver.routes = {"/slow": slow, "/fast": fast}
    add_event(mariadb_engine)
    outcome = run(mariadb_engine, settings)
    assert outcome.delivered == 2
    log = [a for d in deliveries(mariadb_engine) for a in attempts(mariadb_engine, d.id or 0)]
    assert [(a.response_status, a.error) for a in log] == [(200, ""), (200, "")]


# --- auto-disable --------------------------------------------------------------------------


def test_repeated_failures_disable_the_webhook_until_it_is_enabled_again(
    mariadb_engine: Engine, hook_settings: Settings, receiver: Receiver
) -> None:
    settings = hook_settings.model_copy(update={"webhook_disable_after": 3})
    with Session(mariadb_engine) as session:
        factory = make_factory(session).id
        session.commit()
    broken, _ = add_hook(mariadb_engine, receiver.url("/broken"), factory_id=factory)
    watcher, _ = add_hook(mariadb_engine, receiver.url("/watch"), event_types=("alert.raised",))
    receiver.routes = {"/broken": 500}
    with clock.frozen(T0) as move:
        for _ in range(2):
            add_event(mariadb_engine, factory_id=factory)
        first = run(mariadb_engine, settings)
        # One try against the endpoint; its other delivery waits as long as that retry.
        assert (first.retry, first.deferred) == (1, 1)
        waiting = deliveries(mariadb_engine, broken)
        assert attempts(mariadb_engine, waiting[1].id or 0) == []
        assert waiting[1].next_attempt_at == waiting[0].next_attempt_at
        passes = 1
        while hook_row(mariadb_engine, broken).is_active:
            move(clock.now() + dt.timedelta(hours=1))
            run(mariadb_engine, settings)
            passes += 1
            assert passes <= 3
        assert hook_row(mariadb_engine, broken).consecutive_failures == 3
        # Events emitted while it is disabled are not delivered to it.
        add_event(mariadb_engine, factory_id=factory)
        run(mariadb_engine, settings)
    row = hook_row(mariadb_engine, broken)
    assert row.disabled_at is not None
    assert "3 consecutive failed deliveries" in row.disabled_reason
    assert len(receiver.at("/broken")) == 3
    assert {(d.status, d.last_error) for d in deliveries(mariadb_engine, broken)} == {
        (WebhookDeliveryStatus.FAILED, "webhook disabled")
    }
    with Session(mariadb_engine) as session:
        audit = session.exec(select(AuditLog).where(AuditLog.action == "webhook.disabled")).one()
        assert audit.entity_id == str(broken)
        assert audit.actor_type == "system"
    # The alert went to the other webhook, not to the one disabled.
    [alert] = receiver.at("/watch")
    assert json.loads(alert.body)["data"]["alert"] == "webhook_disabled"
    assert json.loads(alert.body)["data"]["webhook_id"] == str(broken)
    assert json.loads(alert.body)["factory_id"] == str(factory)
    # Enabled again: the counter starts from zero and new events arrive.
    with session_scope(mariadb_engine) as session:
        svc.update_webhook(session, EVERYTHING, ADMIN, broken, {"is_active": True})
    row = hook_row(mariadb_engine, broken)
    assert (row.is_active, row.consecutive_failures, row.disabled_at) == (True, 0, None)
    receiver.routes = {}
    add_event(mariadb_engine, factory_id=factory)
    assert run(mariadb_engine, settings).delivered == 1
    assert len(receiver.at("/broken")) == 4
    assert len(deliveries(mariadb_engine, watcher)) == 1


def test_an_expired_lease_counts_as_a_try_and_the_delivery_is_retried(
    mariadb_engine: Engine, hook_settings: Settings, receiver: Receiver
) -> None:
    with clock.frozen(T0) as move:
        add_hook(mariadb_engine, receiver.url())
        add_event(mariadb_engine)
        with session_scope(mariadb_engine) as session:
            svc.fan_out(session, limit=10)
        with session_scope(mariadb_engine) as session:
            [work] = svc.claim(session, hook_settings, owner="dead-run", limit=10)
        # The run died before recording anything; nobody else can take it meanwhile.
        with session_scope(mariadb_engine) as session:
            assert svc.claim(session, hook_settings, owner="other", limit=10) == []
        move(T0 + svc.lease_for(hook_settings) + dt.timedelta(seconds=1))
        outcome = run(mariadb_engine, hook_settings, owner="next-run")
    assert (outcome.recovered, outcome.delivered) == (1, 1)
    log = attempts(mariadb_engine, work.delivery_id)
    assert [(a.attempt_no, a.success) for a in log] == [(1, False), (2, True)]
    assert "lease" in log[0].error
    assert len(receiver.received) == 1


# --- Dagster -------------------------------------------------------------------------------


def test_the_sensor_requests_a_run_only_while_work_waits_and_the_job_delivers(
    mariadb_engine: Engine,
    mariadb_migrated: str,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYSTONE_ENV", "test")
    monkeypatch.setenv("KEYSTONE_DATABASE_URL", mariadb_migrated)
    assert defs.resolve_job_def("deliver_webhooks").name == deliver_webhooks.name
    assert defs.resolve_sensor_def("outbox_sensor").minimum_interval_seconds == 10
    assert defs.resolve_schedule_def("outbox_safety_schedule").cron_schedule == "*/5 * * * *"
    resources = {"database": KeystoneDatabase()}
    with instance_for_test() as instance:
        context = build_sensor_context(instance=instance, resources=resources)
        assert not isinstance(outbox_sensor(context), SensorResult)  # nothing waits
        for _ in range(5):  # events no webhook wants: dispatched by the tick, no run
            add_event(mariadb_engine)
        assert not isinstance(outbox_sensor(context), SensorResult)
        assert deliveries(mariadb_engine) == []
        add_hook(mariadb_engine, receiver.url())
        for _ in range(3):
            add_event(mariadb_engine)
        result = outbox_sensor(context)
        assert isinstance(result, SensorResult)
        [request] = result.run_requests or []
        assert request.tags["keystone/kind"] == "webhooks"
        # While a run is queued, no second one is requested (by the sensor or the schedule).
        queued = instance.create_run_for_job(job_def=deliver_webhooks)
        assert not isinstance(outbox_sensor(context), SensorResult)
        with build_schedule_context(instance=instance, resources=resources) as schedule_context:
            assert isinstance(outbox_safety_schedule(schedule_context), SkipReason)
            instance.delete_run(queued.run_id)
            assert isinstance(outbox_safety_schedule(schedule_context), RunRequest)
        run_result = deliver_webhooks.execute_in_process(
            instance=instance, resources=resources, tags=request.tags
        )
        assert run_result.success
        assert len(receiver.received) == 3
        outputs = [e for e in run_result.all_node_events if e.event_type_value == "STEP_OUTPUT"]
        metadata = outputs[0].step_output_data.metadata
        assert metadata["events"].value == 0  # the sensor's tick fanned them out
        assert metadata["delivered"].value == 3
        assert {r.headers["x-keystone-delivery"] for r in receiver.received} == {
            str(d.id) for d in deliveries(mariadb_engine)
        }
        assert not isinstance(outbox_sensor(context), SensorResult)  # done


# --- the API -------------------------------------------------------------------------------


@dataclass
class Api:
    client: TestClient
    engine: Engine
    factory_a: int
    factory_b: int
    headers: dict[str, dict[str, str]]

    def call(self, method: str, path: str, who: str = "admin", **kw: Any) -> Any:
        headers = {**self.headers[who], **kw.pop("headers", {})}
        return self.client.request(method, f"{V1}{path}", headers=headers, **kw)


@pytest.fixture
def api(app_settings: Settings, mariadb_engine: Engine) -> Iterator[Api]:  # noqa: F811
    with Session(mariadb_engine) as session:
        a, b = make_factory(session).id, make_factory(session).id
        assert a is not None
        assert b is not None
        people = {
            "admin": (Role.ADMIN, []),
            "admin_a": (Role.ADMIN, [a]),
            "admin_ab": (Role.ADMIN, [a, b]),
            "manager": (Role.PRODUCTION_MANAGER, [a]),
        }
        headers = {}
        for name, (role, factories) in people.items():
            user = User(
                account=f"hooks-{name}", password_hash=hash_password("pw-123456"), role=role
            )
            session.add(user)
            session.flush()
            for factory in factories:
                session.add(UserFactory(user_id=user.id, factory_id=factory))  # type: ignore[arg-type]
            token, _ = issue_access_token(
                app_settings, subject=str(user.id), role=role, factory_ids=factories
            )
            headers[name] = {"Authorization": f"Bearer {token}"}
        session.commit()
    with TestClient(create_app(app_settings)) as client:
        yield Api(client, mariadb_engine, a, b, headers)


def test_register_list_update_and_delete_through_the_api(
    api: Api, receiver: Receiver, hook_settings: Settings
) -> None:
    created = api.call(
        "POST",
        "",
        json={
            "url": receiver.url(),
            "event_types": ["episode.approved", "episode.rejected", "episode.approved"],
            "description": "line 3 dashboard",
        },
    )
    assert created.status_code == 201, created.text
    body = created.json()
    secret = body["secret"]
    assert secret.startswith("whsec_")
    assert body["event_types"] == ["episode.approved", "episode.rejected"]
    assert body["factory_id"] is None
    assert body["is_active"] is True
    hook = body["id"]
    shown = api.call("GET", f"/{hook}").json()
    assert "secret" not in shown
    assert shown["description"] == "line 3 dashboard"
    listed = api.call("GET", "").json()
    assert listed["total"] == 1
    assert "secret" not in listed["items"][0]
    assert (
        secret
        not in api.client.get(
            "/api/v1/audit", headers=api.headers["admin"], params={"limit": 100}
        ).text
    )
    catalogue = {e["name"]: e for e in api.call("GET", "/event-types").json()}
    assert set(catalogue) == {e.value for e in EventType} | {"*"}
    assert catalogue["webhook.test"]["subscribable"] is False
    # An admin of factory A registers without naming it: the webhook is A's.
    own = api.call("POST", "", "admin_a", json={"url": receiver.url("/a"), "event_types": ["*"]})
    assert own.status_code == 201
    assert own.json()["factory_id"] == str(api.factory_a)
    assert api.call("GET", "", "admin_a").json()["total"] == 1  # not the global one
    assert api.call("GET", "", params={"factory_id": api.factory_a}).json()["total"] == 1
    # Update: new types, disable, enable.
    patched = api.call("PATCH", f"/{hook}", json={"event_types": ["*"], "is_active": False})
    assert patched.status_code == 200, patched.text
    assert patched.json()["event_types"] == ["*"]
    assert patched.json()["is_active"] is False
    assert patched.json()["disabled_reason"] == "disabled by hooks-admin"
    assert api.call("GET", "", params={"is_active": False}).json()["total"] == 1
    enabled = api.call("PATCH", f"/{hook}", json={"is_active": True}).json()
    assert (enabled["is_active"], enabled["disabled_at"]) == (True, None)
    rotated = api.call("POST", f"/{hook}/rotate-secret")
    assert rotated.status_code == 200
    assert rotated.json()["secret"] not in (secret, None)
    # Test ping: only this webhook, signed with the new secret, with the request id.
    ping = api.call("POST", f"/{hook}/test")
    assert ping.status_code == 202, ping.text
    assert ping.json()["status"] == "pending"
    assert ping.json()["event_type"] == "webhook.test"
    run(api.engine, hook_settings)
    [got] = receiver.at("/hook")
    assert got.headers["x-keystone-event"] == "webhook.test"
    assert got.headers["x-request-id"] == ping.headers["x-request-id"]
    verify_signature(rotated.json()["secret"], got.headers["x-keystone-signature"], got.body)
    assert receiver.at("/a") == []
    # The delivery log.
    log = api.call("GET", f"/{hook}/deliveries").json()
    assert log["total"] == 1
    assert log["items"][0]["status"] == "delivered"
    delivery = log["items"][0]["id"]
    assert api.call("GET", f"/{hook}/deliveries", params={"status": "failed"}).json()["total"] == 0
    assert (
        api.call("GET", f"/{hook}/deliveries", params={"event_type": "webhook.test"}).json()[
            "total"
        ]
        == 1
    )
    detail = api.call("GET", f"/{hook}/deliveries/{delivery}").json()
    assert detail["event"]["type"] == "webhook.test"
    assert detail["event"]["data"]["webhook_id"] == hook
    assert [(a["attempt_no"], a["response_status"], a["success"]) for a in detail["attempts"]] == [
        (1, 200, True)
    ]
    again = api.call("POST", f"/{hook}/deliveries/{delivery}/redeliver")
    assert again.status_code == 202
    assert again.json()["status"] == "pending"
    pending = api.call("POST", f"/{hook}/deliveries/{delivery}/redeliver")
    assert pending.status_code == 409
    assert pending.json()["code"] == "delivery_pending"
    assert pending.json()["detail"]["current_status"] == "pending"
    # Every write was audited.
    with Session(api.engine) as session:
        actions = Counter(
            session.exec(
                select(AuditLog.action).where(col(AuditLog.action).startswith("webhook."))
            ).all()
        )
    assert actions == {
        "webhook.create": 2,
        "webhook.update": 2,
        "webhook.rotate_secret": 1,
        "webhook.test": 1,
        "webhook.redeliver": 1,
    }
    assert api.call("DELETE", f"/{hook}").status_code == 204
    assert api.call("GET", f"/{hook}").status_code == 404
    assert api.call("GET", f"/{hook}/deliveries/{delivery}").status_code == 404


def test_an_inspector_approval_through_the_api_reaches_the_webhook(
    api: Api, receiver: Receiver, hook_settings: Settings
) -> None:
    add_hook(api.engine, receiver.url(), event_types=("episode.approved", "episode.rejected"))
    with Session(api.engine) as session:
        good = make_episode(session, factory_id=api.factory_a, status="needs_inspection").id
        bad = make_episode(session, factory_id=api.factory_a, status="needs_inspection").id
        public = session.get(Episode, good).episode_id  # type: ignore[union-attr]
        session.commit()
    approved = api.client.post(
        f"/api/v1/inspections/{good}/approve", json={}, headers=api.headers["admin"]
    )
    assert approved.status_code == 200, approved.text
    rejected = api.client.post(
        f"/api/v1/inspections/{bad}/reject", json={"reason": "blurry"}, headers=api.headers["admin"]
    )
    assert rejected.status_code == 200
    # A refused decision (already decided) writes nothing.
    assert (
        api.client.post(
            f"/api/v1/inspections/{good}/approve", json={}, headers=api.headers["admin"]
        ).status_code
        == 409
    )
    assert run(api.engine, hook_settings).delivered == 2
    got = {r.headers["x-keystone-event"]: r for r in receiver.received}
    assert set(got) == {"episode.approved", "episode.rejected"}
    approval = json.loads(got["episode.approved"].body)
    assert approval["factory_id"] == str(api.factory_a)
    assert approval["data"]["episode_id"] == public
    assert approval["data"]["episode_row_id"] == str(good)
    assert approval["data"]["status"] == "inspector_approved"
    assert got["episode.approved"].headers["x-request-id"] == approved.headers["x-request-id"]
    assert json.loads(got["episode.rejected"].body)["data"]["reason"] == "blurry"


def test_every_bad_input_is_a_4xx_with_a_stable_code(api: Api, receiver: Receiver) -> None:
    def refused(response: Any, status: int, code: str) -> None:
        assert response.status_code == status, response.text
        assert response.json()["code"] == code, response.text
        assert response.json()["message"]

    url = receiver.url()
    for bad in (
        "ftp://example.com/hook",
        "example.com/hook",
        "http://",
        "http://a b/",
        "http://x:99999/",
    ):
        refused(api.call("POST", "", json={"url": bad, "event_types": ["*"]}), 422, "invalid_url")
    too_long = "http://example.com/" + "a" * 2048
    refused(
        api.call("POST", "", json={"url": too_long, "event_types": ["*"]}), 422, "validation_error"
    )
    unknown = api.call("POST", "", json={"url": url, "event_types": ["episode.exploded"]})
    refused(unknown, 422, "unknown_event_type")
    assert unknown.json()["detail"]["unknown"] == ["episode.exploded"]
    refused(
        api.call("POST", "", json={"url": url, "event_types": ["webhook.test"]}),
        422,
        "unknown_event_type",
    )
    refused(api.call("POST", "", json={"url": url, "event_types": []}), 422, "validation_error")
    refused(api.call("POST", "", json={"url": url}), 422, "validation_error")
    refused(
        api.call("POST", "", json={"url": url, "event_types": ["*"], "secret": "mine"}),
        422,
        "validation_error",
    )
    refused(
        api.call("POST", "", json={"url": url, "event_types": ["*"], "factory_id": 99_999_999}),
        404,
        "reference_not_found",
    )
    refused(
        api.call(
            "POST",
            "",
            content=b"{nope",
            headers={"Content-Type": "application/json"},
        ),
        422,
        "invalid_json",
    )
    # Roles and factories.
    refused(api.call("GET", "", "manager"), 403, "forbidden")
    refused(
        api.call("POST", "", "manager", json={"url": url, "event_types": ["*"]}), 403, "forbidden"
    )
    refused(
        api.call("POST", "", "admin_ab", json={"url": url, "event_types": ["*"]}),
        422,
        "factory_id_required",
    )
    refused(
        api.call(
            "POST",
            "",
            "admin_a",
            json={"url": url, "event_types": ["*"], "factory_id": api.factory_b},
        ),
        404,
        "reference_not_found",
    )
    global_hook = api.call("POST", "", json={"url": url, "event_types": ["*"]}).json()["id"]
    b_hook = api.call(
        "POST", "", json={"url": url, "event_types": ["*"], "factory_id": api.factory_b}
    ).json()["id"]
    for hidden in (global_hook, b_hook):
        for method, path in (
            ("GET", f"/{hidden}"),
            ("PATCH", f"/{hidden}"),
            ("DELETE", f"/{hidden}"),
            ("POST", f"/{hidden}/rotate-secret"),
            ("POST", f"/{hidden}/test"),
            ("GET", f"/{hidden}/deliveries"),
        ):
            response = api.call(method, path, "admin_a", json={} if method != "GET" else None)
            refused(response, 404, "not_found")
    # Unknown ids.
    for method, path in (
        ("GET", "/99999999"),
        ("PATCH", "/99999999"),
        ("DELETE", "/99999999"),
        ("POST", "/99999999/rotate-secret"),
        ("POST", "/99999999/test"),
        ("GET", "/99999999/deliveries"),
        ("GET", f"/{global_hook}/deliveries/99999999"),
        ("POST", f"/{global_hook}/deliveries/99999999/redeliver"),
    ):
        refused(api.call(method, path, json={} if method != "GET" else None), 404, "not_found")
    refused(api.call("GET", "/0"), 422, "validation_error")
    refused(api.call("GET", "/abc"), 422, "validation_error")
    # Updates.
    refused(api.call("PATCH", f"/{global_hook}", json={"url": None}), 422, "validation_error")
    refused(api.call("PATCH", f"/{global_hook}", json={"url": "mailto:x@y"}), 422, "invalid_url")
    refused(
        api.call("PATCH", f"/{global_hook}", json={"event_types": ["nope"]}),
        422,
        "unknown_event_type",
    )
    refused(api.call("PATCH", f"/{global_hook}", json={"secret": "x"}), 422, "validation_error")
    refused(
        api.call("PATCH", f"/{global_hook}", json={"factory_id": 99_999_999}),
        404,
        "reference_not_found",
    )
    a_hook = api.call("POST", "", "admin_a", json={"url": url, "event_types": ["*"]}).json()["id"]
    refused(
        api.call("PATCH", f"/{a_hook}", "admin_a", json={"factory_id": api.factory_b}),
        404,
        "reference_not_found",
    )
    moved = api.call("PATCH", f"/{a_hook}", json={"factory_id": api.factory_b})
    assert moved.json()["factory_id"] == str(api.factory_b)  # an admin of every factory may
    refused(api.call("GET", f"/{a_hook}", "admin_a"), 404, "not_found")
    refused(
        api.call("GET", f"/{global_hook}/deliveries", params={"status": "lost"}),
        422,
        "validation_error",
    )
    refused(api.call("GET", "", params={"offset": -1}), 422, "validation_error")
    # A delivery of another webhook is not found under this one.
    ping = api.call("POST", f"/{b_hook}/test").json()
    refused(api.call("GET", f"/{global_hook}/deliveries/{ping['id']}"), 404, "not_found")
    refused(
        api.call("POST", f"/{b_hook}/deliveries/{ping['id']}/redeliver"), 409, "delivery_pending"
    )
    # A disabled webhook takes no ping and no redelivery.
    api.call("PATCH", f"/{b_hook}", json={"is_active": False})
    refused(api.call("POST", f"/{b_hook}/test"), 409, "webhook_disabled")
    refused(
        api.call("POST", f"/{b_hook}/deliveries/{ping['id']}/redeliver"), 409, "webhook_disabled"
    )
