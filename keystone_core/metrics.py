"""Prometheus metrics of the work itself (QA, sync, uploads) and of the factory's state.

Two kinds, because they live in different places:

- **Events** (counters, histograms) are observed in the process that does the work: an API
  worker (ACKs) or a Dagster run (QA verdicts, sync attempts). With several processes on a
  host they share ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode) and
  any scrape endpoint on that host exports the sum.
- **State** (queue depths and ages, stuck leases, the last hour of QA verdicts, upload
  silence) is read from the database at scrape time by :class:`FactoryStateCollector`,
  through the same :func:`keystone_core.services.signals.read_signals` the alert rules use,
  so the Prometheus rules and Keystone's own alerts see the same numbers.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlmodel import Session

from keystone_core import clock
from keystone_core.services.signals import FactorySignals, read_signals

log = logging.getLogger(__name__)

# Seconds: from a few (a hot queue) to a day (a cloud outage).
_LATENCY_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)

QA_RESULTS = Counter(
    "keystone_qa_results_total", "QA results recorded, by verdict and tier.", ["verdict", "tier"]
)
QA_DURATION = Histogram(
    "keystone_qa_duration_seconds",
    "Time to score one episode (read, checks, verdict), by tier.",
    ["tier"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
SYNC_ATTEMPTS = Counter(
    "keystone_sync_attempts_total",
    "Cloud sync attempts by target and outcome (synced, duplicate, retry, failed, …).",
    ["target", "outcome"],
)
APPROVED_TO_SYNCED = Histogram(
    "keystone_approved_to_synced_seconds",
    "From an episode's approval to its verified copy in the cloud.",
    buckets=_LATENCY_BUCKETS,
)
UPLOAD_TO_ACK = Histogram(
    "keystone_upload_ack_latency_seconds",
    "From the device's upload_complete (first check of the objects) to the upload_ack sent.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)


def observe_qa_result(verdict: str, tier: str, seconds: float) -> None:
    QA_RESULTS.labels(verdict, tier).inc()
    QA_DURATION.labels(tier).observe(max(0.0, seconds))


def observe_sync_attempt(target: str, outcome: str) -> None:
    SYNC_ATTEMPTS.labels(target, outcome).inc()


def observe_synced(approved_at: dt.datetime | None, synced_at: dt.datetime) -> None:
    if approved_at is not None:
        seconds = (clock.as_utc(synced_at) - clock.as_utc(approved_at)).total_seconds()
        APPROVED_TO_SYNCED.observe(max(0.0, seconds))


def observe_ack(checked_at: dt.datetime | None, acked_at: dt.datetime) -> None:
    if checked_at is not None:
        seconds = (clock.as_utc(acked_at) - clock.as_utc(checked_at)).total_seconds()
        UPLOAD_TO_ACK.observe(max(0.0, seconds))


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ("factory",)) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def state_families(readings: list[FactorySignals]) -> list[Metric]:
    """The gauges of one reading (see the module docstring and docs/observability.md)."""
    upload = _gauge("keystone_upload_queue_depth", "Tasks in `uploading`.")
    upload_age = _gauge(
        "keystone_upload_queue_oldest_seconds", "Age of the oldest task in `uploading`."
    )
    inspection = _gauge("keystone_inspection_queue_depth", "Episodes in `needs_inspection`.")
    inspection_age = _gauge(
        "keystone_inspection_queue_oldest_seconds", "Age of the oldest episode to inspect."
    )
    qa_backlog = _gauge("keystone_qa_backlog", "Episodes in `pending_qa` or `qa_running`.")
    sync = _gauge(
        "keystone_sync_queue_depth",
        "Sync jobs with work left, by status.",
        ("factory", "status"),
    )
    sync_age = _gauge(
        "keystone_sync_queue_oldest_seconds", "Age of the oldest sync job with work left."
    )
    sync_failed = _gauge("keystone_sync_failed_jobs", "Sync jobs in `failed` (need a resync).")
    stuck = _gauge(
        "keystone_stuck_leases", "Claims whose lease has expired, by kind.", ("factory", "kind")
    )
    qa_hour = _gauge(
        "keystone_qa_results_last_hour",
        "QA results of the last hour, by verdict.",
        ("factory", "verdict"),
    )
    last_upload = _gauge(
        "keystone_last_upload_timestamp_seconds", "When the latest episode arrived (Unix time)."
    )
    expecting = _gauge(
        "keystone_factory_expecting_uploads",
        "1 inside the factory's production hours with an order in production, else 0.",
    )
    silence = _gauge(
        "keystone_upload_silence_seconds",
        "Seconds without an upload since the later of the last upload and today's "
        "production start (0 outside production hours).",
    )
    for s in readings:
        f = s.slug
        upload.add_metric([f], s.upload_queue)
        upload_age.add_metric([f], s.upload_oldest_s)
        inspection.add_metric([f], s.inspection_queue)
        inspection_age.add_metric([f], s.inspection_oldest_s)
        qa_backlog.add_metric([f], s.qa_backlog)
        for status in ("queued", "retry_wait", "in_progress"):
            sync.add_metric([f, status], s.sync_queue.get(status, 0))
        sync_age.add_metric([f], s.sync_oldest_s)
        sync_failed.add_metric([f], s.sync_failed)
        stuck.add_metric([f, "sync"], s.stuck_sync_leases)
        stuck.add_metric([f, "qa"], s.stuck_qa_leases)
        for verdict in ("auto_approved", "needs_inspection", "qa_failed"):
            qa_hour.add_metric([f, verdict], s.qa_last_hour.get(verdict, 0))
        if s.last_upload_at is not None:
            last_upload.add_metric([f], s.last_upload_at.timestamp())
        expecting.add_metric([f], 1.0 if s.expecting_uploads else 0.0)
        silence.add_metric([f], s.upload_silence_s)
    return [
        upload,
        upload_age,
        inspection,
        inspection_age,
        qa_backlog,
        sync,
        sync_age,
        sync_failed,
        stuck,
        qa_hour,
        last_upload,
        expecting,
        silence,
    ]


class FactoryStateCollector(Collector):
    """State gauges read from the database at scrape time, cached for ``cache_s`` seconds
    so that several scrapers (or a scrape storm) cost one reading."""

    def __init__(self, engine: Engine, *, cache_s: float = 5.0) -> None:
        self.engine = engine
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._cached: tuple[float, list[FactorySignals]] | None = None

    def _readings(self) -> list[FactorySignals]:
        with self._lock:
            cached = self._cached
            if cached is not None and time.monotonic() - cached[0] < self.cache_s:
                return cached[1]
            with Session(self.engine) as session:
                readings = read_signals(session)
            self._cached = (time.monotonic(), readings)
            return readings

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "keystone_state_up", "1 when the factory state could be read from the database."
        )
        try:
            readings = self._readings()
        except Exception:  # a scrape must answer (with up=0) while the database is down
            log.warning("factory state for /metrics could not be read", exc_info=True)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from state_families(readings)


def exposition(
    multiproc_dir: Path | None, *extra: CollectorRegistry | Callable[[], bytes]
) -> bytes:
    """The text exposition of this process (or of every process sharing ``multiproc_dir``)
    followed by ``extra`` registries (one scrape, several sources, no name overlaps)."""
    if multiproc_dir is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(multiproc_dir))  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    for source in extra:
        body += source() if callable(source) else generate_latest(source)
    return body


def state_registry(engine: Engine, *, cache_s: float = 5.0) -> CollectorRegistry:
    """A registry holding only the database-backed state collector (one per API app)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FactoryStateCollector(engine, cache_s=cache_s))
    return registry
