"""The catalog: scenes and their subscenes, skills and standard operating procedures (SOPs)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ColumnElement, String, cast, select
from sqlmodel import Session, col

from keystone_api.crud import add_crud_routes
from keystone_api.schemas import IdStr, Metadata, PartialUpdate
from keystone_core.errors import ConflictError, PermissionDeniedError, ValidationFailed
from keystone_core.models import SOP, Order, Scene, Skill, Subscene, Task
from keystone_core.services import crud
from keystone_core.services.crud import Family, Guard
from keystone_core.services.scope import Scope

router = APIRouter(prefix="/api/v1", tags=["catalog"])

SKILL_SLUG = r"^[a-z0-9][a-z0-9_-]{0,99}$"
VERSION = r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,19}$"
# TEXT columns hold 65,535 bytes: 16,000 characters fit even at 4 bytes each (utf8mb4).
TEXT_MAX = 16_000


def _require_factory_scene(factory_id: int | None, scope: Scope) -> None:
    """Global scenes (no factory) are shared by every factory, so only a caller that sees
    every factory may change them; a factory-scoped manager edits its own factory's scenes."""
    if factory_id is None and scope.factory_ids is not None:
        raise PermissionDeniedError(
            "global scenes and their subscenes are managed by an admin with every factory",
            code="forbidden",
        )


def _scene_rules(_session: Session, row: Scene, scope: Scope) -> None:
    _require_factory_scene(row.factory_id, scope)


def _subscene_rules(session: Session, row: Subscene, scope: Scope) -> None:
    # create_row/update_row already checked that the scene exists and is visible.
    scene = session.get(Scene, row.scene_id)
    _require_factory_scene(None if scene is None else scene.factory_id, scope)


def _visible_subscenes(scope: Scope) -> ColumnElement[bool] | None:
    # Subscenes have no factory column: they follow their scene's.
    if scope.factory_ids is None:
        return None
    scenes = select(col(Scene.id)).where(
        col(Scene.factory_id).is_(None) | col(Scene.factory_id).in_(sorted(scope.factory_ids))
    )
    return col(Subscene.scene_id).in_(scenes)


def _known_skills(session: Session, row: SOP, _scope: Scope) -> None:
    wanted = set(row.skill_sequence)
    if not wanted:
        return
    found = set(
        session.execute(
            select(col(Skill.slug)).where(
                col(Skill.slug).in_(sorted(wanted)), col(Skill.deleted_at).is_(None)
            )
        ).scalars()
    )
    unknown = sorted(wanted - found)
    if unknown:
        raise ValidationFailed(
            f"skill_sequence names unknown skills: {', '.join(unknown)}",
            code="unknown_skills",
            field="skill_sequence",
            unknown=unknown,
        )


SCENES = Family(
    model=Scene,
    entity="scene",
    factory_column="factory_id",
    unique=(("name",),),
    guards=(
        Guard(Subscene, "scene_id", "subscenes"),
        Guard(Order, "scene_id", "orders"),
        Guard(Task, "scene_id", "tasks"),
    ),
    validate=_scene_rules,
)

SUBSCENES = Family(
    model=Subscene,
    entity="subscene",
    factory_column=None,
    visibility=_visible_subscenes,
    unique=(("scene_id", "name"),),
    guards=(Guard(Task, "subscene_id", "tasks"),),
    validate=_subscene_rules,
)

SKILLS = Family(
    model=Skill,
    entity="skill",
    factory_column=None,
    unique=(("slug", "version"),),
    guards=(Guard(Task, "skill_id", "tasks"),),
)

SOPS = Family(
    model=SOP,
    entity="sop",
    factory_column=None,
    unique=(("slug", "version"),),
    guards=(Guard(Task, "sop_id", "tasks"),),
    validate=_known_skills,
)


class SceneCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    factory_id: int | None = Field(
        default=None, description="The owning factory; null makes a global scene (admins)."
    )
    name: str = Field(min_length=1, max_length=128)
    description: str = Field(default="", max_length=1024)
    initial_scene_layout_template: str = Field(default="", max_length=TEXT_MAX)


class SceneUpdate(PartialUpdate):
    name: str | None = Field(default=None, min_length=1, max_length=128)
    description: str | None = Field(default=None, max_length=1024)
    initial_scene_layout_template: str | None = Field(default=None, max_length=TEXT_MAX)


class ScenePublic(BaseModel):
    id: IdStr
    factory_id: IdStr | None
    name: str
    description: str
    initial_scene_layout_template: str
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


def scene_filters(
    factory_id: int | None = None,
    name: Annotated[str | None, Query(max_length=128)] = None,
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if factory_id is not None:
        where.append(col(Scene.factory_id) == factory_id)
    if name is not None:
        where.append(col(Scene.name) == name)
    return where


class SubsceneCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scene_id: int
    name: str = Field(min_length=1, max_length=128)
    description: str = Field(default="", max_length=1024)
    initial_scene_layout: str = Field(default="", max_length=TEXT_MAX)


class SubsceneUpdate(PartialUpdate):
    name: str | None = Field(default=None, min_length=1, max_length=128)
    description: str | None = Field(default=None, max_length=1024)
    initial_scene_layout: str | None = Field(default=None, max_length=TEXT_MAX)


class SubscenePublic(BaseModel):
    id: IdStr
    scene_id: IdStr
    name: str
    description: str
    initial_scene_layout: str
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


def subscene_filters(scene_id: int | None = None) -> list[ColumnElement[bool]]:
    return [] if scene_id is None else [col(Subscene.scene_id) == scene_id]


class SkillCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slug: str = Field(pattern=SKILL_SLUG)
    version: str = Field(default="1.0.0", pattern=VERSION)
    description: str = Field(default="", max_length=1024)
    metadata: dict[str, Any] = Field(default_factory=dict)


class SkillUpdate(PartialUpdate):
    # slug and version identify the skill (SOPs name it); a change is a new skill.
    description: str | None = Field(default=None, max_length=1024)
    metadata: dict[str, Any] | None = None


class SkillPublic(BaseModel):
    id: IdStr
    slug: str
    version: str
    description: str
    metadata: Metadata
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


def skill_filters(
    slug: Annotated[str | None, Query(max_length=100)] = None,
    version: Annotated[str | None, Query(max_length=20)] = None,
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if slug is not None:
        where.append(col(Skill.slug) == slug)
    if version is not None:
        where.append(col(Skill.version) == version)
    return where


SkillSequence = Annotated[
    list[Annotated[str, Field(pattern=SKILL_SLUG)]],
    Field(max_length=200, description="Skill slugs in the order the operator performs them."),
]


class SOPCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slug: str = Field(pattern=SKILL_SLUG)
    version: str = Field(default="1.0.0", pattern=VERSION)
    description: str = Field(default="", max_length=1024)
    skill_sequence: SkillSequence = Field(default_factory=list)
    content: str = Field(default="", max_length=TEXT_MAX)


class SOPUpdate(PartialUpdate):
    description: str | None = Field(default=None, max_length=1024)
    skill_sequence: SkillSequence | None = None
    content: str | None = Field(default=None, max_length=TEXT_MAX)


class SOPPublic(BaseModel):
    id: IdStr
    slug: str
    version: str
    description: str
    skill_sequence: list[str]
    content: str
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


def sop_filters(
    slug: Annotated[str | None, Query(max_length=100)] = None,
    version: Annotated[str | None, Query(max_length=20)] = None,
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if slug is not None:
        where.append(col(SOP.slug) == slug)
    if version is not None:
        where.append(col(SOP.version) == version)
    return where


def _check_scene_delete(session: Session, row_id: int, scope: Scope) -> None:
    scene = crud.get_row(session, SCENES, scope, row_id, for_update=True)
    _require_factory_scene(scene.factory_id, scope)


def _check_subscene_delete(session: Session, row_id: int, scope: Scope) -> None:
    subscene = crud.get_row(session, SUBSCENES, scope, row_id, for_update=True)
    _subscene_rules(session, subscene, scope)


def _check_skill_delete(session: Session, row_id: int, scope: Scope) -> None:
    """SOPs name skills by slug (any version): the last live version of a slug an SOP still
    names cannot go."""
    skill = crud.get_row(session, SKILLS, scope, row_id, for_update=True)
    others = session.execute(
        select(col(Skill.id)).where(
            col(Skill.slug) == skill.slug,
            col(Skill.id) != row_id,
            col(Skill.deleted_at).is_(None),
        )
    ).first()
    if others is not None:
        return
    # The LIKE narrows the candidates portably (JSON is text on SQLite and MariaDB); the
    # exact membership test is done on the decoded list.
    candidates = session.execute(
        select(col(SOP.skill_sequence)).where(
            col(SOP.deleted_at).is_(None),
            cast(col(SOP.skill_sequence), String).like(f'%"{skill.slug}"%'),
        )
    ).scalars()
    count = sum(1 for sequence in candidates if skill.slug in sequence)
    if count:
        raise ConflictError(
            f"skill {row_id} is still referenced by {count} sops",
            code="still_referenced",
            referenced_by="sops",
            count=count,
        )


add_crud_routes(
    router,
    "/scenes",
    SCENES,
    public=ScenePublic,
    create=SceneCreate,
    update=SceneUpdate,
    filters=scene_filters,
    before_delete=_check_scene_delete,
)
add_crud_routes(
    router,
    "/subscenes",
    SUBSCENES,
    public=SubscenePublic,
    create=SubsceneCreate,
    update=SubsceneUpdate,
    filters=subscene_filters,
    before_delete=_check_subscene_delete,
)
add_crud_routes(
    router,
    "/skills",
    SKILLS,
    public=SkillPublic,
    create=SkillCreate,
    update=SkillUpdate,
    filters=skill_filters,
    before_delete=_check_skill_delete,
)
add_crud_routes(
    router,
    "/sops",
    SOPS,
    public=SOPPublic,
    create=SOPCreate,
    update=SOPUpdate,
    filters=sop_filters,
)
