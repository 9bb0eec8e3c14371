"""The sync protocol's request and response bodies (docs/sync.md, "Cloud receiver protocol")."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from keystone_receiver.settings import MAX_OBJECTS_CEILING

API_PREFIX = "/api/v1/sync"
# Identifiers and object names become S3 key segments: no slashes, no leading dot or dash.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
SESSION_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_OBJECT_SIZE = 5 * 1024**4  # S3's largest object, 5 TiB
MAX_METADATA_BYTES = 64 * 1024


def _no_dot_dot(name: str) -> str:
    if ".." in name:
        raise ValueError("must not contain '..'")
    return name


Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
ObjectName = Annotated[str, StringConstraints(pattern=NAME_PATTERN), AfterValidator(_no_dot_dot)]
Sha256 = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
SessionId = Annotated[str, StringConstraints(pattern=SESSION_PATTERN)]


def _metadata_fits(value: dict[str, Any]) -> dict[str, Any]:
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"is {size} bytes as JSON; at most {MAX_METADATA_BYTES} are accepted")
    return value


class _Request(BaseModel):
    # Unknown fields are ignored so a newer sender can talk to this receiver.
    model_config = ConfigDict(extra="ignore")


class ObjectSpec(_Request):
    """One object of an episode as the sender has it."""

    name: ObjectName
    size: int = Field(ge=0, le=MAX_OBJECT_SIZE, strict=True)
    sha256: Sha256


def _unique_names(objects: list[ObjectSpec]) -> list[ObjectSpec]:
    names = [o.name for o in objects]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"object names must be unique; repeated: {', '.join(duplicates)}")
    return objects


class EpisodeManifest(_Request):
    """``POST /api/v1/sync/episode``: what the sender is about to upload."""

    episode_id: Identifier
    factory_id: Identifier
    device_id: Identifier
    task_id: Identifier
    objects: Annotated[
        list[ObjectSpec],
        Field(min_length=1, max_length=MAX_OBJECTS_CEILING),
        AfterValidator(_unique_names),
    ]
    metadata: Annotated[dict[str, Any], AfterValidator(_metadata_fits)]


class PartUpload(BaseModel):
    """One part of a multipart object: PUT exactly ``size`` bytes to ``url``."""

    part_number: int
    size: int
    url: str
    done: bool


class ObjectUpload(BaseModel):
    """Where to put one object: ``url`` (one PUT) or ``parts``; neither once ``done``."""

    name: str
    size: int
    key: str
    done: bool
    url: str | None = None
    part_size: int | None = None
    parts: list[PartUpload] | None = None


class SessionOpened(BaseModel):
    """202 to ``POST /api/v1/sync/episode``."""

    session: str
    episode_id: str
    uploads: list[ObjectUpload]


class CompleteRequest(_Request):
    """``POST /api/v1/sync/episode/{episode_id}/complete``."""

    session: SessionId


class SyncedObject(BaseModel):
    name: str
    size: int
    sha256: str
    key: str


class EpisodeSynced(BaseModel):
    """200 to ``complete``: the episode is stored and verified."""

    episode_id: str
    synced_at: datetime
    objects: list[SyncedObject]


class ObjectProgress(SyncedObject):
    done: bool


class EpisodeState(BaseModel):
    """200 to ``GET /api/v1/sync/episode/{episode_id}``."""

    episode_id: str
    status: Literal["incomplete", "complete"]
    session: str
    synced_at: datetime | None
    session_count: int
    complete_count: int
    objects: list[ObjectProgress]


class Health(BaseModel):
    status: Literal["ok"]


class ErrorBody(BaseModel):
    """Every error: a stable ``code``, a ``message`` for people, and code-specific fields."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class ObjectMismatch(BaseModel):
    """One object ``complete`` could not verify; it must be uploaded again."""

    name: str
    reason: Literal["missing", "size", "sha256"]
    expected: int | str
    actual: int | str | None
    missing_parts: list[int] | None = None


class AlreadySyncedBody(ErrorBody):
    episode_id: str
    synced_at: datetime


class SessionMismatchBody(ErrorBody):
    session: str


class ObjectMismatchBody(ErrorBody):
    objects: list[ObjectMismatch]
