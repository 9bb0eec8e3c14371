"""What is recorded: scenes, subscenes, skills and standard operating procedures."""

from __future__ import annotations

from sqlalchemy import Text, UniqueConstraint
from sqlmodel import Field

from keystone_core.models.base import SoftDeleted, fk_field, id_field


class Scene(SoftDeleted, table=True):
    __tablename__ = "scenes"

    id: int | None = id_field()
    factory_id: int | None = fk_field("factories.id", nullable=True)
    name: str = Field(max_length=128, unique=True)
    description: str = Field(default="", max_length=1024)


class Subscene(SoftDeleted, table=True):
    __tablename__ = "subscenes"
    __table_args__ = (UniqueConstraint("scene_id", "name", name="uq_subscenes_scene_name"),)

    id: int | None = id_field()
    scene_id: int = fk_field("scenes.id")
    name: str = Field(max_length=128)
    description: str = Field(default="", max_length=1024)


class Skill(SoftDeleted, table=True):
    __tablename__ = "skills"

    id: int | None = id_field()
    name: str = Field(max_length=128, unique=True)
    description: str = Field(default="", max_length=1024)


class SOP(SoftDeleted, table=True):
    """A standard operating procedure: how an operator performs a skill."""

    __tablename__ = "sops"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_sops_name_version"),)

    id: int | None = id_field()
    skill_id: int | None = fk_field("skills.id", nullable=True)
    name: str = Field(max_length=128)
    version: str = Field(default="1", max_length=32)
    content: str = Field(default="", sa_type=Text)
