"""Robot types, robots and stations: their CRUD rules, binding history and config templates."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, false, func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.errors import ConflictError, NotFoundError, ValidationFailed
from keystone_core.models import (
    Batch,
    BatchStatus,
    DataCollector,
    Factory,
    Robot,
    RobotConfigTemplate,
    RobotType,
    RobotWorkstationBinding,
    Role,
    Task,
    TaskStatus,
    Workstation,
)
from keystone_core.services import crud, device_templates
from keystone_core.services.audit import Actor, record_audit
from keystone_core.services.scope import Scope

# The two files axon-config downloads after registering; listed even before they exist so
# an operator sees which ones are missing.
STANDARD_TEMPLATES = ("recorder.yaml", "transfer.yaml")
FILENAME_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
_FILENAME = re.compile(FILENAME_PATTERN)
# robot_config_templates.content is TEXT: 64 KiB on MySQL/MariaDB.
MAX_TEMPLATE_BYTES = 65_535
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.]+)\s*\}\}")

# axon-config aborts rendering on any placeholder it cannot fill, leaving the device
# unprovisioned, so a template may use only these: the registration response's keys and
# the names axon-config derives itself (axon-protocol.md, Appendix A).
TEMPLATE_PLACEHOLDERS = frozenset(
    {
        "device_id",
        "robot_id",
        "factory",
        "factory_id",
        "robot_type",
        "robot_type_id",
        "robot_model",
        "ws_client_auth_token",
        "callback_allowlist.allowed_host",
        "callback_allowlist.allowed_path_prefix",
        "keystone_url",
        "keystone_ws_url",
        "recorder_rpc_url",
        "transfer_ws_url",
        "endpoints.keystone_ws_url",
        "endpoints.recorder_rpc_url",
        "endpoints.transfer_ws_url",
        "config_dir",
        "registered_at",
        "s3.endpoint_url",
        "s3.bucket",
        "s3.region",
        "s3.prefix",
        "s3.access_key",
        "s3.secret_key",
        "s3.credentials",
    }
)

_FINAL_TASK_STATES = (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)
_OPEN_BATCH_STATES = (BatchStatus.PENDING, BatchStatus.ACTIVE)


def _lock(session: Session, model: type[Robot] | type[DataCollector], row_id: int) -> Any:
    """The row, locked until commit: binding checks of the same robot/collector serialize."""
    row = session.exec(select(model).where(col(model.id) == row_id).with_for_update()).first()
    if row is None:
        raise NotFoundError(f"{model.__tablename__} {row_id} not found", code="reference_not_found")
    return row


def check_station(session: Session, station: Workstation, scope: Scope) -> None:
    """A station's robot and collector are live, in its factory, and at no other live station."""
    if station.robot_id is not None:
        robot: Robot = _lock(session, Robot, station.robot_id)
        if robot.factory_id != station.factory_id:
            raise ValidationFailed(
                f"robot {robot.id} belongs to another factory than the station",
                code="factory_mismatch",
                field="robot_id",
            )
        if robot.status == "retired":
            raise ConflictError(
                f"robot {robot.id} is retired and cannot be placed at a station",
                code="robot_retired",
                field="robot_id",
            )
        other = _other_station(session, col(Workstation.robot_id) == robot.id, station.id)
        if other is not None:
            raise ConflictError(
                f"robot {robot.id} is already bound to station {other}",
                code="robot_already_bound",
                field="robot_id",
                station_id=str(other),
            )
    if station.data_collector_id is not None:
        collector: DataCollector = _lock(session, DataCollector, station.data_collector_id)
        if collector.factory_id != station.factory_id:
            raise ValidationFailed(
                f"data collector {collector.id} belongs to another factory than the station",
                code="factory_mismatch",
                field="data_collector_id",
            )
        other = _other_station(
            session, col(Workstation.data_collector_id) == collector.id, station.id
        )
        if other is not None:
            raise ConflictError(
                f"data collector {collector.id} is already bound to station {other}",
                code="data_collector_already_bound",
                field="data_collector_id",
                station_id=str(other),
            )


def _other_station(
    session: Session, condition: ColumnElement[bool], station_id: int | None
) -> int | None:
    query = select(Workstation.id).where(condition, col(Workstation.deleted_at).is_(None))
    if station_id is not None:
        query = query.where(col(Workstation.id) != station_id)
    return session.exec(query.limit(1)).first()


def check_robot(session: Session, robot: Robot, scope: Scope) -> None:
    """Asset ids are unique; a robot at a station can neither leave its factory nor retire."""
    if robot.asset_id is not None:
        # Checked here, not as a Family unique group: that would also match two NULLs.
        query = select(Robot.id).where(
            col(Robot.asset_id) == robot.asset_id, col(Robot.deleted_at).is_(None)
        )
        if robot.id is not None:
            query = query.where(col(Robot.id) != robot.id)
        if session.exec(query.limit(1)).first() is not None:
            raise ConflictError(
                f"a robot with asset_id={robot.asset_id!r} already exists",
                code="duplicate",
                field="asset_id",
            )
    if robot.id is None:
        return
    station = session.exec(
        select(Workstation).where(
            col(Workstation.robot_id) == robot.id, col(Workstation.deleted_at).is_(None)
        )
    ).first()
    if station is None:
        return
    if station.factory_id != robot.factory_id:
        raise ConflictError(
            f"robot {robot.id} is bound to station {station.id}; unbind it before moving it",
            code="robot_bound",
            field="factory_id",
            station_id=str(station.id),
        )
    if robot.status == "retired":
        raise ConflictError(
            f"robot {robot.id} is bound to station {station.id}; unbind it before retiring it",
            code="robot_bound",
            field="status",
            station_id=str(station.id),
        )


def _visible_stations(scope: Scope) -> ColumnElement[bool] | None:
    if scope.role is not Role.DATA_COLLECTOR:
        return None
    if scope.data_collector_id is None:
        return false()
    return col(Workstation.data_collector_id) == scope.data_collector_id


def _visible_robots(scope: Scope) -> ColumnElement[bool] | None:
    """A collector sees the robot of its own station only."""
    if scope.role is not Role.DATA_COLLECTOR:
        return None
    if scope.data_collector_id is None:
        return false()
    return col(Robot.id).in_(
        select(Workstation.robot_id).where(
            col(Workstation.data_collector_id) == scope.data_collector_id,
            col(Workstation.deleted_at).is_(None),
        )
    )


ROBOT_TYPES = crud.Family(
    model=RobotType,
    entity="robot_type",
    factory_column=None,
    unique=(("model",),),
    guards=(crud.Guard(Robot, "robot_type_id", "robots"),),
)

ROBOTS = crud.Family(
    model=Robot,
    entity="robot",
    visibility=_visible_robots,
    unique=(("device_id",),),
    guards=(crud.Guard(Workstation, "robot_id", "stations"),),
    validate=check_robot,
    # The device id is baked into the device's config and every object key it uploads.
    immutable=frozenset({"device_id"}),
)

STATIONS = crud.Family(
    model=Workstation,
    entity="station",
    visibility=_visible_stations,
    unique=(("factory_id", "name"),),
    validate=check_station,
    immutable=frozenset({"factory_id"}),
)


def _user_id(actor: Actor) -> int | None:
    return int(actor.id) if actor.type == "user" and actor.id.isdigit() else None


def record_binding_change(
    session: Session, station: Workstation, previous_robot_id: int | None, actor: Actor
) -> None:
    """Close the previous robot's open binding at ``station`` and open one for its robot now."""
    assert station.id is not None
    current = None if station.deleted_at is not None else station.robot_id
    if current == previous_robot_id:
        return
    now = clock.now()
    if previous_robot_id is not None:
        session.execute(
            update(RobotWorkstationBinding)
            .where(
                col(RobotWorkstationBinding.robot_id) == previous_robot_id,
                col(RobotWorkstationBinding.workstation_id) == station.id,
                col(RobotWorkstationBinding.unbound_at).is_(None),
            )
            .values(unbound_at=now, updated_at=now)
        )
    if current is not None:
        session.add(
            RobotWorkstationBinding(
                robot_id=current,
                workstation_id=station.id,
                bound_at=now,
                bound_by_user_id=_user_id(actor),
            )
        )
    session.flush()


def create_station(
    session: Session, scope: Scope, actor: Actor, values: Mapping[str, Any]
) -> Workstation:
    station = crud.create_row(session, STATIONS, scope, actor, values)
    record_binding_change(session, station, None, actor)
    return station


def update_station(
    session: Session, scope: Scope, actor: Actor, station_id: int, changes: Mapping[str, Any]
) -> Workstation:
    previous = crud.get_row(session, STATIONS, scope, station_id, for_update=True).robot_id
    station = crud.update_row(session, STATIONS, scope, actor, station_id, changes)
    record_binding_change(session, station, previous, actor)
    return station


def delete_station(session: Session, scope: Scope, actor: Actor, station_id: int) -> None:
    """Soft-delete a station without open work; its robot and collector become free."""
    station = crud.get_row(session, STATIONS, scope, station_id, for_update=True)
    previous = station.robot_id
    open_work = (
        (
            "open batches",
            select(func.count())
            .select_from(Batch)
            .where(
                col(Batch.workstation_id) == station_id,
                col(Batch.deleted_at).is_(None),
                col(Batch.status).in_(_OPEN_BATCH_STATES),
            ),
        ),
        (
            "unfinished tasks",
            select(func.count())
            .select_from(Task)
            .where(
                col(Task.workstation_id) == station_id,
                col(Task.deleted_at).is_(None),
                col(Task.status).not_in(_FINAL_TASK_STATES),
            ),
        ),
    )
    for label, query in open_work:
        count = session.exec(query).one()
        if count:
            raise ConflictError(
                f"station {station_id} is still referenced by {count} {label}",
                code="still_referenced",
                referenced_by=label,
                count=int(count),
            )
    crud.delete_row(session, STATIONS, scope, actor, station_id)
    record_binding_change(session, station, previous, actor)


def lookup_stations(
    session: Session, scope: Scope, station_ids: list[int]
) -> list[tuple[Workstation, Robot | None, DataCollector | None]]:
    """The stations among ``station_ids`` the scope may see, deleted ones included."""
    if not station_ids:
        return []
    visible = crud.scoped(STATIONS, scope, include_deleted=True).subquery()
    query = (
        select(Workstation, Robot, DataCollector)
        .join(visible, col(visible.c.id) == col(Workstation.id))
        .outerjoin(Robot, col(Robot.id) == col(Workstation.robot_id))
        .outerjoin(DataCollector, col(DataCollector.id) == col(Workstation.data_collector_id))
        .where(col(Workstation.id).in_(sorted(set(station_ids))))
        .order_by(col(Workstation.id))
    )
    return [(s, r, d) for s, r, d in session.exec(query).all()]


@dataclass(frozen=True)
class BindingEntry:
    binding: RobotWorkstationBinding
    workstation_name: str
    factory_id: int


def workstation_history(
    session: Session, scope: Scope, robot_id: int, *, limit: int, offset: int
) -> tuple[list[BindingEntry], int]:
    """Where a visible robot stood, newest first, limited to stations the scope may see."""
    crud.get_row(session, ROBOTS, scope, robot_id, include_deleted=True)
    conditions: list[ColumnElement[bool]] = [col(RobotWorkstationBinding.robot_id) == robot_id]
    if scope.factory_ids is not None:
        conditions.append(col(Workstation.factory_id).in_(sorted(scope.factory_ids)))
    base = select(RobotWorkstationBinding, Workstation.name, Workstation.factory_id).join(
        Workstation, col(Workstation.id) == col(RobotWorkstationBinding.workstation_id)
    )
    count_query = (
        select(func.count())
        .select_from(RobotWorkstationBinding)
        .join(Workstation, col(Workstation.id) == col(RobotWorkstationBinding.workstation_id))
        .where(*conditions)
    )
    total = session.exec(count_query).one()
    rows = session.exec(
        base.where(*conditions)
        .order_by(
            col(RobotWorkstationBinding.bound_at).desc(), col(RobotWorkstationBinding.id).desc()
        )
        .limit(crud.clamp_limit(limit))
        .offset(offset)
    ).all()
    entries = [BindingEntry(binding=b, workstation_name=n, factory_id=f) for b, n, f in rows]
    return entries, int(total)


# --- config templates -----------------------------------------------------------------


def check_filename(filename: str) -> str:
    """A bare file name: letters, digits, ``.``, ``_``, ``-``; never a path."""
    if not _FILENAME.match(filename) or filename in {".", ".."}:
        raise ValidationFailed(
            "filename must be 1 to 128 of [A-Za-z0-9._-] and not a path",
            code="invalid_filename",
            field="filename",
        )
    return filename


def placeholders_of(content: str) -> set[str]:
    return {m.group(1) for m in _PLACEHOLDER.finditer(content)}


def check_template(content: str) -> None:
    if not content.strip():
        raise ValidationFailed("content must not be empty", code="empty_template", field="content")
    size = len(content.encode("utf-8"))
    if size > MAX_TEMPLATE_BYTES:
        raise ValidationFailed(
            f"content is {size} bytes; at most {MAX_TEMPLATE_BYTES} are stored",
            code="template_too_large",
            field="content",
        )
    unknown = sorted(placeholders_of(content) - TEMPLATE_PLACEHOLDERS)
    if unknown:
        raise ValidationFailed(
            "axon-config cannot fill these placeholders: " + ", ".join(unknown),
            code="unknown_placeholder",
            field="content",
            placeholders=unknown,
            allowed=sorted(TEMPLATE_PLACEHOLDERS),
        )


def live_robot_type(session: Session, robot_type_id: int) -> RobotType:
    row = session.exec(
        select(RobotType).where(
            col(RobotType.id) == robot_type_id, col(RobotType.deleted_at).is_(None)
        )
    ).first()
    if row is None:
        raise NotFoundError(f"robot_type {robot_type_id} not found")
    return row


@dataclass(frozen=True)
class TemplateSlot:
    filename: str
    exists: bool
    updated_at: datetime | None


def list_templates(session: Session, robot_type_id: int) -> list[TemplateSlot]:
    """The standard files (present or not) followed by any other stored file, by name."""
    live_robot_type(session, robot_type_id)
    stored = {
        t.filename: t
        for t in session.exec(
            select(RobotConfigTemplate).where(
                col(RobotConfigTemplate.robot_type_id) == robot_type_id
            )
        ).all()
    }
    names = list(STANDARD_TEMPLATES) + sorted(set(stored) - set(STANDARD_TEMPLATES))
    return [
        TemplateSlot(
            filename=name,
            exists=name in stored,
            updated_at=stored[name].updated_at if name in stored else None,
        )
        for name in names
    ]


def _template(
    session: Session, robot_type_id: int, filename: str, *, for_update: bool = False
) -> RobotConfigTemplate | None:
    query = select(RobotConfigTemplate).where(
        col(RobotConfigTemplate.robot_type_id) == robot_type_id,
        col(RobotConfigTemplate.filename) == filename,
    )
    if for_update:
        query = query.with_for_update()
    return session.exec(query).first()


def get_template(session: Session, robot_type_id: int, filename: str) -> RobotConfigTemplate:
    live_robot_type(session, robot_type_id)
    template = _template(session, robot_type_id, check_filename(filename))
    if template is None:
        raise NotFoundError(f"config template {filename} of robot_type {robot_type_id} not found")
    return template


def _template_snapshot(template: RobotConfigTemplate) -> dict[str, Any]:
    return {
        "robot_type_id": template.robot_type_id,
        "filename": template.filename,
        "content": template.content,
    }


def put_template(
    session: Session, actor: Actor, robot_type_id: int, filename: str, content: str
) -> RobotConfigTemplate:
    """Create or replace a template; the audit row keeps the previous content."""
    robot_type = live_robot_type(session, robot_type_id)
    check_filename(filename)
    check_template(content)
    if filename in STANDARD_TEMPLATES:
        other_name = next(n for n in STANDARD_TEMPLATES if n != filename)
        other = _template(session, robot_type_id, other_name)
        device_templates.check_device_config(
            filename,
            content,
            other.content if other else device_templates.default_template(robot_type, other_name),
        )
    template = _template(session, robot_type_id, filename, for_update=True)
    before = None if template is None else _template_snapshot(template)
    if template is None:
        template = RobotConfigTemplate(
            robot_type_id=robot_type_id, filename=filename, content=content
        )
        action = "robot_config_template.create"
    else:
        template.content = content
        template.updated_at = clock.now()
        action = "robot_config_template.update"
    session.add(template)
    try:
        session.flush()
    except IntegrityError:  # a concurrent first PUT of the same file won the insert
        raise ConflictError(
            f"config template {filename} was created concurrently; retry", code="duplicate"
        ) from None
    record_audit(
        session,
        actor,
        action,
        entity_type="robot_config_template",
        entity_id=template.id or "",
        before=before,
        after=_template_snapshot(template),
    )
    return template


def delete_template(session: Session, actor: Actor, robot_type_id: int, filename: str) -> None:
    live_robot_type(session, robot_type_id)
    template = _template(session, robot_type_id, check_filename(filename), for_update=True)
    if template is None:
        raise NotFoundError(f"config template {filename} of robot_type {robot_type_id} not found")
    before = _template_snapshot(template)
    template_id = template.id or ""
    session.delete(template)
    session.flush()
    record_audit(
        session,
        actor,
        "robot_config_template.delete",
        entity_type="robot_config_template",
        entity_id=template_id,
        before=before,
    )


def device_values(session: Session, robot_type: RobotType, device_id: str) -> dict[str, str]:
    """The identity placeholders of a live robot of ``robot_type``; nothing secret."""
    row = session.exec(
        select(Robot, Factory)
        .join(Factory, col(Factory.id) == col(Robot.factory_id))
        .where(
            col(Robot.device_id) == device_id,
            col(Robot.robot_type_id) == robot_type.id,
            col(Robot.deleted_at).is_(None),
        )
    ).first()
    if row is None:
        raise NotFoundError(f"device {device_id} of robot_type {robot_type.id} not found")
    robot, factory = row
    return {
        "device_id": robot.device_id,
        "robot_id": str(robot.id),
        "factory": factory.name,
        "factory_id": str(factory.id),
        "robot_type": robot_type.model,
        "robot_type_id": str(robot_type.id),
        "robot_model": robot_type.model,
    }


def render_template(content: str, values: Mapping[str, str]) -> str:
    """Fill the known placeholders; others stay for axon-config to fill on the device."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), content)


def rendered_config(
    session: Session, robot_type_id: int, filename: str, device_id: str | None
) -> str:
    """A template as axon-config downloads it: raw, or with one device's identity filled."""
    robot_type = live_robot_type(session, robot_type_id)
    template = _template(session, robot_type_id, check_filename(filename))
    # recorder.yaml and transfer.yaml fall back to Keystone's defaults.
    content = (
        template.content
        if template is not None
        else device_templates.default_template(robot_type, filename)
    )
    if content is None:
        raise NotFoundError(f"config template {filename} of robot_type {robot_type_id} not found")
    if device_id is None:
        return content
    return render_template(content, device_values(session, robot_type, device_id))
