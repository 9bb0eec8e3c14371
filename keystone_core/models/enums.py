"""Status and role enums; their string values are part of the API and the database."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"
    PRODUCTION_MANAGER = "production_manager"
    DATA_COLLECTOR = "data_collector"
    DATA_INSPECTOR = "data_inspector"


class OrderStatus(StrEnum):
    CREATED = "created"
    IN_PROGRESS = "in_progress"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class OrderPriority(StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    URGENT = "urgent"


class BatchStatus(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    RECALLED = "recalled"


class TaskStatus(StrEnum):
    PENDING = "pending"
    READY = "ready"
    IN_PROGRESS = "in_progress"
    UPLOADING = "uploading"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class EpisodeStatus(StrEnum):
    """QA state of an episode."""

    PENDING_QA = "pending_qa"
    QA_RUNNING = "qa_running"
    AUTO_APPROVED = "auto_approved"
    NEEDS_INSPECTION = "needs_inspection"
    QA_FAILED = "qa_failed"
    INSPECTOR_APPROVED = "inspector_approved"
    REJECTED = "rejected"


class SyncStatus(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    RETRY_WAIT = "retry_wait"
    SYNCED = "synced"
    FAILED = "failed"


class SyncTarget(StrEnum):
    S3 = "s3"
    HTTP = "http"


class QATier(StrEnum):
    FAST = "fast"
    THOROUGH = "thorough"


class InspectionDecision(StrEnum):
    APPROVED = "approved"
    REJECTED = "rejected"


class OutboxStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookDeliveryStatus(StrEnum):
    """One event for one webhook: pending → delivered, or retry_wait → … → failed."""

    PENDING = "pending"
    RETRY_WAIT = "retry_wait"
    DELIVERED = "delivered"
    FAILED = "failed"


class AlertState(StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"


class AlertSeverity(StrEnum):
    WARNING = "warning"
    CRITICAL = "critical"


class CredentialKind(StrEnum):
    """What a hashed device token authenticates."""

    WS_CLIENT = "ws_client"
    S3_ACCESS_KEY = "s3_access_key"
