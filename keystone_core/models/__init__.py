"""Every table of Keystone; importing this package registers them all on SQLModel.metadata."""

from keystone_core.models.audit import AuditLog, OutboxEvent, RevokedToken, Webhook
from keystone_core.models.catalog import SOP, Scene, Skill, Subscene
from keystone_core.models.device import (
    DeviceCommand,
    DeviceConnection,
    DeviceEvent,
    DeviceUpload,
    EnrollmentWindow,
    TransferStatus,
)
from keystone_core.models.enums import (
    BatchStatus,
    CredentialKind,
    EpisodeStatus,
    InspectionDecision,
    OrderPriority,
    OrderStatus,
    OutboxStatus,
    QATier,
    Role,
    SyncStatus,
    SyncTarget,
    TaskStatus,
)
from keystone_core.models.episode import Episode, Inspection, QAResult
from keystone_core.models.organization import Factory, Organization, Workstation
from keystone_core.models.people import DataCollector, Inspector, User, UserFactory
from keystone_core.models.production import Batch, Order, Task
from keystone_core.models.robot import (
    DeviceCredential,
    Robot,
    RobotConfigTemplate,
    RobotType,
    RobotWorkstationBinding,
)
from keystone_core.models.sync import SyncAttempt, SyncJob

__all__ = [
    "SOP",
    "AuditLog",
    "Batch",
    "BatchStatus",
    "CredentialKind",
    "DataCollector",
    "DeviceCommand",
    "DeviceConnection",
    "DeviceCredential",
    "DeviceEvent",
    "DeviceUpload",
    "EnrollmentWindow",
    "Episode",
    "EpisodeStatus",
    "Factory",
    "Inspection",
    "InspectionDecision",
    "Inspector",
    "Order",
    "OrderPriority",
    "OrderStatus",
    "Organization",
    "OutboxEvent",
    "OutboxStatus",
    "QAResult",
    "QATier",
    "RevokedToken",
    "Robot",
    "RobotConfigTemplate",
    "RobotType",
    "RobotWorkstationBinding",
    "Role",
    "Scene",
    "Skill",
    "Subscene",
    "SyncAttempt",
    "SyncJob",
    "SyncStatus",
    "SyncTarget",
    "Task",
    "TaskStatus",
    "TransferStatus",
    "User",
    "UserFactory",
    "Webhook",
    "Workstation",
]
