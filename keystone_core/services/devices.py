"""Device identity: enrollment windows, registration, device tokens, decommissioning.

The real ``axon-config`` registers without credentials and treats any answer but 201 as a
failure, so registration is gated here instead: only inside an enrollment window an admin
opened for the factory (time-limited, optionally limited to source networks, a robot type,
a number of registrations or a list of pre-provisioned robots). Each registration gives
the device a ``kws_v1_`` token (shown once, stored as SHA-256) and, where the object store
supports it, an access key limited to the device's own ``{factory_id}/{device_id}/`` prefix.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, update
from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    ValidationFailed,
)
from keystone_core.models import (
    CredentialKind,
    DeviceCredential,
    EnrollmentWindow,
    Factory,
    Robot,
    RobotType,
)
from keystone_core.security import DEVICE_TOKEN_PREFIX, hash_token, new_device_token
from keystone_core.services import crud
from keystone_core.services.audit import Actor, record_audit
from keystone_core.services.robots import ROBOTS
from keystone_core.services.scope import Scope
from keystone_core.settings import Settings
from keystone_core.storage.device_keys import device_prefix, issue_device_key, revoke_device_key

CALLBACK_PATH_PREFIX = "/api/v1/callbacks/"


def device_id_for(factory_id: int, robot_type_id: int, sequence: int) -> str:
    """``AB-F####-T####-######``: factory id, robot type id, sequence per (factory, type)."""
    return f"AB-F{factory_id:04d}-T{robot_type_id:04d}-{sequence:06d}"


# --- endpoints ------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceEndpoints:
    """Where a device reaches Keystone: plain http:// and ws:// (the programs speak no TLS)."""

    base_url: str

    @property
    def ws_base(self) -> str:
        return "ws://" + self.base_url.removeprefix("http://")

    def recorder_rpc_url(self, device_id: str) -> str:
        return f"{self.ws_base}/recorder/{device_id}"

    @property
    def transfer_ws_url(self) -> str:
        # The transfer program appends "/{device_id}" itself.
        return f"{self.ws_base}/transfer"

    @property
    def start_callback_url(self) -> str:
        return f"{self.base_url}{CALLBACK_PATH_PREFIX}start"

    @property
    def finish_callback_url(self) -> str:
        return f"{self.base_url}{CALLBACK_PATH_PREFIX}finish"

    @property
    def host(self) -> str:
        return self.base_url.removeprefix("http://")


def endpoints(settings: Settings, request_base_url: str) -> DeviceEndpoints:
    """The configured device base URL, else the one the request came in on (as ``http://``)."""
    if settings.device_base_url:
        return DeviceEndpoints(settings.device_base_url.rstrip("/"))
    base = request_base_url.rstrip("/")
    for scheme in ("https://", "http://"):
        base = base.removeprefix(scheme)
    return DeviceEndpoints("http://" + base.split("/", 1)[0])


# --- enrollment windows ---------------------------------------------------------------


def _check_networks(networks: list[str]) -> list[str]:
    out = []
    for index, text in enumerate(networks):
        try:
            out.append(str(ipaddress.ip_network(text.strip(), strict=False)))
        except ValueError:
            raise ValidationFailed(
                f"allowed_networks[{index}] is not an IP network (CIDR): {text!r}",
                code="invalid_network",
                field=f"allowed_networks[{index}]",
            ) from None
    return out


def _live_factory(session: Session, factory_id: int, scope: Scope) -> Factory:
    factory = session.get(Factory, factory_id)
    if factory is None or factory.deleted_at is not None or not scope.can_see(factory_id):
        raise NotFoundError(f"factory {factory_id} not found", code="reference_not_found")
    return factory


def open_window(
    session: Session,
    settings: Settings,
    scope: Scope,
    actor: Actor,
    *,
    factory_id: int,
    duration_minutes: int,
    robot_type_id: int | None = None,
    allowed_networks: list[str] | None = None,
    max_registrations: int | None = None,
    robot_ids: list[int] | None = None,
    note: str = "",
) -> EnrollmentWindow:
    """Open a registration window for one factory; it closes itself at ``expires_at``."""
    _live_factory(session, factory_id, scope)
    if duration_minutes > settings.enrollment_max_minutes:
        raise ValidationFailed(
            f"duration_minutes is at most {settings.enrollment_max_minutes} "
            "(KEYSTONE_ENROLLMENT_MAX_MINUTES)",
            code="window_too_long",
            field="duration_minutes",
        )
    if robot_type_id is not None:
        robot_type = session.get(RobotType, robot_type_id)
        if robot_type is None or robot_type.deleted_at is not None:
            raise NotFoundError(f"robot_type {robot_type_id} not found", code="reference_not_found")
    provisioned = sorted(set(robot_ids or []))
    for robot_id in provisioned:
        robot = session.get(Robot, robot_id)
        if robot is None or robot.deleted_at is not None or robot.factory_id != factory_id:
            raise ValidationFailed(
                f"robot {robot_id} is not a live robot of factory {factory_id}",
                code="invalid_robot",
                field="robot_ids",
            )
        if robot_type_id is not None and robot.robot_type_id != robot_type_id:
            raise ValidationFailed(
                f"robot {robot_id} is not of robot_type {robot_type_id}",
                code="invalid_robot",
                field="robot_ids",
            )
    now = clock.now()
    window = EnrollmentWindow(
        factory_id=factory_id,
        robot_type_id=robot_type_id,
        opened_by_user_id=int(actor.id) if actor.type == "user" and actor.id.isdigit() else None,
        expires_at=now + timedelta(minutes=duration_minutes),
        allowed_networks=_check_networks(allowed_networks or []),
        max_registrations=max_registrations,
        robot_ids=provisioned,
        note=note,
    )
    session.add(window)
    session.flush()
    record_audit(
        session,
        actor,
        "enrollment_window.open",
        entity_type="enrollment_window",
        entity_id=window.id or "",
        after=window_snapshot(window),
        factory_id=factory_id,
    )
    return window


def window_snapshot(window: EnrollmentWindow) -> dict[str, Any]:
    return {
        "factory_id": window.factory_id,
        "robot_type_id": window.robot_type_id,
        "expires_at": window.expires_at.isoformat(),
        "closed_at": None if window.closed_at is None else window.closed_at.isoformat(),
        "allowed_networks": list(window.allowed_networks),
        "max_registrations": window.max_registrations,
        "registered_count": window.registered_count,
        "robot_ids": list(window.robot_ids),
        "note": window.note,
    }


def window_is_open(window: EnrollmentWindow, now: datetime | None = None) -> bool:
    now = now or clock.now()
    return (
        window.closed_at is None
        and window.expires_at > now
        and (window.max_registrations is None or window.registered_count < window.max_registrations)
    )


def get_window(session: Session, scope: Scope, window_id: int) -> EnrollmentWindow:
    window = session.get(EnrollmentWindow, window_id)
    if window is None or not scope.can_see(window.factory_id):
        raise NotFoundError(f"enrollment window {window_id} not found")
    return window


def list_windows(
    session: Session,
    scope: Scope,
    *,
    factory_id: int | None,
    open_only: bool,
    limit: int,
    offset: int,
) -> tuple[list[EnrollmentWindow], int]:
    query = select(EnrollmentWindow)
    if scope.factory_ids is not None:
        query = query.where(col(EnrollmentWindow.factory_id).in_(sorted(scope.factory_ids)))
    if factory_id is not None:
        query = query.where(col(EnrollmentWindow.factory_id) == factory_id)
    if open_only:
        query = query.where(
            col(EnrollmentWindow.closed_at).is_(None),
            col(EnrollmentWindow.expires_at) > clock.now(),
        )
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(
        query.order_by(col(EnrollmentWindow.id).desc()).limit(limit).offset(offset)
    ).all()
    return list(rows), int(total)


def close_window(session: Session, scope: Scope, actor: Actor, window_id: int) -> EnrollmentWindow:
    window = get_window(session, scope, window_id)
    before = window_snapshot(window)
    if window.closed_at is None:
        window.closed_at = clock.now()
        window.updated_at = window.closed_at
        session.add(window)
        session.flush()
        record_audit(
            session,
            actor,
            "enrollment_window.close",
            entity_type="enrollment_window",
            entity_id=window_id,
            before=before,
            after=window_snapshot(window),
            factory_id=window.factory_id,
        )
    return window


# --- registration ---------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectStoreGrant:
    """What a device needs to upload: the bucket, its prefix and (maybe) its own key."""

    endpoint_url: str
    bucket: str
    region: str
    prefix: str
    access_key: str = ""
    secret_key: str = ""
    # ``scoped`` (a key limited to ``prefix``), ``shared`` (Keystone's key) or ``none``.
    mode: str = "none"
    key_id: str | None = None


@dataclass
class Registration:
    robot: Robot
    factory: Factory
    robot_type: RobotType
    token: str
    window: EnrollmentWindow
    grant: ObjectStoreGrant | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _lookup_factory(session: Session, text: str) -> Factory:
    """``factory`` as axon-config sends it: the factory's name (or its slug)."""
    name = text.strip()
    row = session.exec(
        select(Factory)
        .where(
            col(Factory.deleted_at).is_(None),
            or_(col(Factory.name) == name, col(Factory.slug) == name),
        )
        .order_by(col(Factory.id))
    ).first()
    if row is None:
        raise NotFoundError(f"factory {name!r} not found", code="factory_not_found")
    return row


def _lookup_robot_type(session: Session, text: str) -> RobotType:
    model = text.strip()
    row = session.exec(
        select(RobotType).where(col(RobotType.deleted_at).is_(None), col(RobotType.model) == model)
    ).first()
    if row is None:
        raise NotFoundError(f"robot_type {model!r} not found", code="robot_type_not_found")
    return row


def _address_allowed(networks: list[str], client_ip: str | None) -> bool:
    if not networks:
        return True
    if client_ip is None:
        return False
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n, strict=False) for n in networks)


def _open_window_for(
    session: Session, factory: Factory, robot_type: RobotType, client_ip: str | None
) -> EnrollmentWindow:
    """The factory's open window that admits this caller, locked until commit."""
    now = clock.now()
    windows = session.exec(
        select(EnrollmentWindow)
        .where(
            col(EnrollmentWindow.factory_id) == factory.id,
            col(EnrollmentWindow.closed_at).is_(None),
            col(EnrollmentWindow.expires_at) > now,
        )
        .order_by(col(EnrollmentWindow.id))
        .with_for_update()
    ).all()
    if not windows:
        raise PermissionDeniedError(
            f"no enrollment window is open for factory {factory.name!r}; "
            "an admin opens one with POST /api/v1/enrollment_windows",
            code="enrollment_closed",
        )
    reasons = []
    for window in windows:
        if window.robot_type_id is not None and window.robot_type_id != robot_type.id:
            reasons.append("robot_type")
        elif not _address_allowed(window.allowed_networks, client_ip):
            reasons.append("network")
        elif not window_is_open(window, now):
            reasons.append("full")
        else:
            return window
    if "full" in reasons:
        raise ConflictError(
            f"the enrollment window of factory {factory.name!r} has no registrations left",
            code="enrollment_exhausted",
        )
    if "network" in reasons:
        raise PermissionDeniedError(
            f"registrations for factory {factory.name!r} are not accepted from {client_ip}",
            code="network_not_allowed",
        )
    raise PermissionDeniedError(
        f"the open enrollment window of factory {factory.name!r} does not admit "
        f"robot_type {robot_type.model!r}",
        code="robot_type_not_enrolled",
    )


def _next_device_id(session: Session, factory_id: int, robot_type_id: int) -> str:
    """The next ``AB-F####-T####-######`` (serialized by the locked window row)."""
    prefix = device_id_for(factory_id, robot_type_id, 0)[:-6]
    taken = session.exec(
        select(col(Robot.device_id)).where(col(Robot.device_id).startswith(prefix))
    ).all()
    sequence = 0
    for device_id in taken:
        tail = device_id[len(prefix) :]
        if tail.isdigit():
            sequence = max(sequence, int(tail))
    return device_id_for(factory_id, robot_type_id, sequence + 1)


def _provisioned_robot(session: Session, window: EnrollmentWindow) -> Robot:
    """The oldest pre-provisioned robot of the window that has not registered yet."""
    robot = session.exec(
        select(Robot)
        .where(
            col(Robot.id).in_(window.robot_ids),
            col(Robot.deleted_at).is_(None),
            col(Robot.registered_at).is_(None),
        )
        .order_by(col(Robot.id))
        .with_for_update()
    ).first()
    if robot is None:
        raise ConflictError(
            "every pre-provisioned robot of the enrollment window has registered",
            code="enrollment_exhausted",
        )
    return robot


def register_device(
    session: Session,
    *,
    factory_name: str,
    robot_type_model: str,
    client_ip: str | None,
    request_id: str | None = None,
) -> Registration:
    """Create (or claim) the robot, issue its token; the caller adds object-store access."""
    factory = _lookup_factory(session, factory_name)
    robot_type = _lookup_robot_type(session, robot_type_model)
    window = _open_window_for(session, factory, robot_type, client_ip)
    assert factory.id is not None
    assert robot_type.id is not None
    assert window.id is not None
    now = clock.now()
    if window.robot_ids:
        robot = _provisioned_robot(session, window)
        if robot.robot_type_id != robot_type.id:
            raise ConflictError(
                f"the next pre-provisioned robot is of another robot type than "
                f"{robot_type.model!r}",
                code="robot_type_mismatch",
            )
        robot.registered_at = now
        robot.updated_at = now
    else:
        robot = Robot(
            factory_id=factory.id,
            robot_type_id=robot_type.id,
            device_id=_next_device_id(session, factory.id, robot_type.id),
            registered_at=now,
            meta={"registered_from": client_ip or "", "enrollment_window_id": window.id},
        )
    session.add(robot)
    session.flush()
    assert robot.id is not None
    session.execute(
        update(EnrollmentWindow)
        .where(col(EnrollmentWindow.id) == window.id)
        .values(registered_count=col(EnrollmentWindow.registered_count) + 1, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    token = _issue_token(session, robot.id)
    actor = Actor(type="device", id=robot.device_id, account=robot.device_id, request_id=request_id)
    record_audit(
        session,
        actor,
        "device.register",
        entity_type="robot",
        entity_id=robot.id,
        after={
            "device_id": robot.device_id,
            "factory_id": factory.id,
            "robot_type_id": robot_type.id,
            "enrollment_window_id": window.id,
            "client_ip": client_ip,
        },
        factory_id=factory.id,
    )
    return Registration(
        robot=robot, factory=factory, robot_type=robot_type, token=token, window=window
    )


def record_object_store_key(session: Session, robot_id: int, key_id: str) -> None:
    """Remember a device's own access key id (never its secret) so it can be revoked."""
    session.add(
        DeviceCredential(
            robot_id=robot_id,
            kind=CredentialKind.S3_ACCESS_KEY,
            token_hash=hash_token("s3:" + key_id),
            token_prefix=key_id[:16],
            external_id=key_id,
        )
    )
    session.flush()


# --- device tokens --------------------------------------------------------------------


def _issue_token(session: Session, robot_id: int) -> str:
    token = new_device_token()
    session.add(
        DeviceCredential(
            robot_id=robot_id,
            kind=CredentialKind.WS_CLIENT,
            token_hash=hash_token(token),
            token_prefix=token[: len(DEVICE_TOKEN_PREFIX) + 4],
        )
    )
    session.flush()
    return token


@dataclass(frozen=True)
class Rotation:
    robot: Robot
    token: str
    rotated_at: datetime
    previous_valid_until: datetime | None


def rotate_token(
    session: Session, settings: Settings, scope: Scope, actor: Actor, robot_id: int
) -> Rotation:
    """A new token; the previous ones stay valid for the overlap window, then never."""
    robot = session.exec(select(Robot).where(col(Robot.id) == robot_id).with_for_update()).first()
    if robot is None or robot.deleted_at is not None or not scope.can_see(robot.factory_id):
        raise NotFoundError(f"robot {robot_id} not found")
    if robot.status == "retired":
        raise ConflictError(f"robot {robot_id} is retired", code="robot_retired")
    now = clock.now()
    until = now + timedelta(hours=settings.device_token_overlap_hours)
    live = session.exec(
        select(DeviceCredential).where(
            col(DeviceCredential.robot_id) == robot_id,
            col(DeviceCredential.kind) == CredentialKind.WS_CLIENT,
            col(DeviceCredential.revoked_at).is_(None),
        )
    ).all()
    for credential in live:
        if credential.expires_at is None or credential.expires_at > until:
            credential.expires_at = until
            credential.updated_at = now
            session.add(credential)
    token = _issue_token(session, robot_id)
    record_audit(
        session,
        actor,
        "robot.rotate_ws_client_auth_token",
        entity_type="robot",
        entity_id=robot_id,
        after={"previous_tokens_valid_until": until.isoformat(), "rotated": len(live)},
        factory_id=robot.factory_id,
    )
    return Rotation(
        robot=robot, token=token, rotated_at=now, previous_valid_until=until if live else None
    )


@dataclass(frozen=True)
class DeviceIdentity:
    robot_id: int
    factory_id: int
    device_id: str
    robot_type_id: int


def _identity(robot: Robot) -> DeviceIdentity:
    assert robot.id is not None
    return DeviceIdentity(
        robot_id=robot.id,
        factory_id=robot.factory_id,
        device_id=robot.device_id,
        robot_type_id=robot.robot_type_id,
    )


def live_device(session: Session, device_id: str) -> DeviceIdentity:
    """A registered, not decommissioned device, or NotFoundError."""
    robot = session.exec(
        select(Robot).where(col(Robot.device_id) == device_id, col(Robot.deleted_at).is_(None))
    ).first()
    if robot is None:
        raise NotFoundError(f"device {device_id} not found", code="device_not_found")
    return _identity(robot)


def _valid_credential(session: Session, token: str) -> tuple[DeviceCredential, Robot] | None:
    now = clock.now()
    row = session.exec(
        select(DeviceCredential, Robot)
        .join(Robot, col(Robot.id) == col(DeviceCredential.robot_id))
        .where(
            col(DeviceCredential.token_hash) == hash_token(token),
            col(DeviceCredential.kind) == CredentialKind.WS_CLIENT,
            col(DeviceCredential.revoked_at).is_(None),
            or_(
                col(DeviceCredential.expires_at).is_(None),
                col(DeviceCredential.expires_at) > now,
            ),
            col(Robot.deleted_at).is_(None),
        )
    ).first()
    if row is None:
        return None
    credential, robot = row
    return credential, robot


def authenticate_device_token(session: Session, token: str) -> DeviceIdentity:
    """The device a ``kws_v1_`` token belongs to (valid, not revoked, robot not deleted)."""
    if not token.startswith(DEVICE_TOKEN_PREFIX):
        raise AuthenticationError("not a device token", code="invalid_token")
    found = _valid_credential(session, token)
    if found is None:
        raise AuthenticationError("device token is invalid or revoked", code="invalid_token")
    credential, robot = found
    _touch(session, credential)
    return _identity(robot)


def _touch(session: Session, credential: DeviceCredential) -> None:
    now = clock.now()
    last = credential.last_used_at
    # One write a minute at most: sockets reconnect and callbacks come often.
    if last is None or now - last > timedelta(minutes=1):
        session.execute(
            update(DeviceCredential)
            .where(col(DeviceCredential.id) == credential.id)
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )


def revoke_device(session: Session, actor: Actor, robot_id: int) -> list[str]:
    """Revoke every credential of a robot; return the object-store key ids to delete."""
    now = clock.now()
    rows = session.exec(
        select(DeviceCredential).where(
            col(DeviceCredential.robot_id) == robot_id,
            col(DeviceCredential.revoked_at).is_(None),
        )
    ).all()
    keys = []
    for credential in rows:
        credential.revoked_at = now
        credential.updated_at = now
        session.add(credential)
        if credential.kind is CredentialKind.S3_ACCESS_KEY and credential.external_id:
            keys.append(credential.external_id)
    if rows:
        record_audit(
            session,
            actor,
            "robot.revoke_credentials",
            entity_type="robot",
            entity_id=robot_id,
            after={"revoked": len(rows), "object_store_keys": keys},
        )
    session.flush()
    return keys


def registration_values(registration: Registration, links: DeviceEndpoints) -> dict[str, Any]:
    """The 201 body axon-config stores; every scalar becomes a template placeholder."""
    robot, factory, robot_type = registration.robot, registration.factory, registration.robot_type
    grant = registration.grant
    body: dict[str, Any] = {
        "device_id": robot.device_id,
        "factory": factory.name,
        "factory_id": str(factory.id),
        "robot_type": robot_type.model,
        "robot_type_id": str(robot_type.id),
        "robot_id": str(robot.id),
        "ws_client_auth_token": registration.token,
        "callback_allowlist": {
            "allowed_host": links.host,
            "allowed_path_prefix": CALLBACK_PATH_PREFIX,
        },
        "endpoints": {
            "keystone_ws_url": links.ws_base,
            "recorder_rpc_url": links.recorder_rpc_url(robot.device_id),
            "transfer_ws_url": links.transfer_ws_url,
        },
        "s3": {
            "endpoint_url": grant.endpoint_url if grant else "",
            "bucket": grant.bucket if grant else "",
            "region": grant.region if grant else "",
            "prefix": grant.prefix if grant else "",
            "access_key": grant.access_key if grant else "",
            "secret_key": grant.secret_key if grant else "",
            "credentials": grant.mode if grant else "none",
        },
    }
    return body


def device_scope_keys(values: Mapping[str, Any]) -> set[str]:
    """Dotted names of every scalar in a registration body (what templates may use)."""
    out: set[str] = set()
    for key, value in values.items():
        if isinstance(value, Mapping):
            out |= {f"{key}.{sub}" for sub in device_scope_keys(value)}
        else:
            out.add(key)
    return out


# --- object-store access --------------------------------------------------------------


def grant_object_store(session: Session, settings: Settings, registration: Registration) -> None:
    """Give the registering device what it needs to upload (per KEYSTONE_DEVICE_S3_CREDENTIALS).

    An ``iam`` key is created before the transaction commits; if the commit fails the
    caller revokes it (:func:`revoke_object_store_key`), so nothing is left half-made.
    """
    robot, factory = registration.robot, registration.factory
    assert robot.id is not None
    assert factory.id is not None
    bucket = settings.bucket_for_factory(str(factory.id))
    prefix = device_prefix(factory.id, robot.device_id)
    endpoint = settings.s3_endpoint_url or ""
    mode = settings.device_s3_credentials
    if mode == "iam":
        key = issue_device_key(settings, bucket, prefix, robot.device_id)
        record_object_store_key(session, robot.id, key.access_key)
        registration.grant = ObjectStoreGrant(
            endpoint_url=endpoint,
            bucket=bucket,
            region=settings.s3_region,
            prefix=prefix,
            access_key=key.access_key,
            secret_key=key.secret_key,
            mode="scoped",
            key_id=key.access_key,
        )
    elif mode == "shared":
        registration.grant = ObjectStoreGrant(
            endpoint_url=endpoint,
            bucket=bucket,
            region=settings.s3_region,
            prefix=prefix,
            access_key=(
                settings.s3_access_key.get_secret_value() if settings.s3_access_key else ""
            ),
            secret_key=(
                settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else ""
            ),
            mode="shared",
        )
    else:
        registration.grant = ObjectStoreGrant(
            endpoint_url=endpoint, bucket=bucket, region=settings.s3_region, prefix=prefix
        )


def revoke_object_store_key(settings: Settings, device_id: str) -> bool:
    return revoke_device_key(settings, device_id)


def decommission(session: Session, settings: Settings, actor: Actor, robot_id: int) -> None:
    """A deleted robot: its tokens and object-store key stop working, its sockets close.

    (The workers holding its sockets close them at their next heartbeat; new upgrades
    are refused because the robot is gone.)
    """
    robot = session.get(Robot, robot_id)
    keys = revoke_device(session, actor, robot_id)
    if keys and robot is not None and settings.device_s3_credentials == "iam":
        revoke_device_key(settings, robot.device_id)


def visible_device(session: Session, scope: Scope, device_id: str) -> Robot:
    """A live robot by device id, if the caller may see it (a collector: its station's)."""
    robot = session.exec(
        select(Robot).where(col(Robot.device_id) == device_id, col(Robot.deleted_at).is_(None))
    ).first()
    if robot is None or robot.id is None:
        raise NotFoundError(f"device {device_id} not found", code="device_not_found")
    try:
        return crud.get_row(session, ROBOTS, scope, robot.id)
    except NotFoundError:
        raise NotFoundError(f"device {device_id} not found", code="device_not_found") from None


def may_see(session: Session, scope: Scope, device_id: str) -> bool:
    try:
        visible_device(session, scope, device_id)
    except NotFoundError:
        return False
    return True


def identity_of(robot: Robot) -> DeviceIdentity:
    return _identity(robot)
