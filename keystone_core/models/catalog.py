"""What is recorded: scenes, subscenes, skills and standard operating procedures."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Text, UniqueConstraint
from sqlmodel import Field

from keystone_core.models.base import SoftDeleted, fk_field, id_field, metadata_field


class Scene(SoftDeleted, table=True):
    __tablename__ = "scenes"

    id: int | None = id_field()
    factory_id: int | None = fk_field("factories.id", nullable=True)
    name: str = Field(max_length=128, unique=True)
    description: str = Field(default="", max_length=1024)
    initial_scene_layout_template: str = Field(default="", sa_type=Text)


class Subscene(SoftDeleted, table=True):
    __tablename__ = "subscenes"
    __table_args__ = (UniqueConstraint("scene_id", "name", name="uq_subscenes_scene_name"),)

    id: int | None = id_field()
    scene_id: int = fk_field("scenes.id")
    name: str = Field(max_length=128)
    description: str = Field(default="", max_length=1024)
    initial_scene_layout: str = Field(default="", sa_type=Text)


class Skill(SoftDeleted, table=True):
    __tablename__ = "skills"
    __table_args__ = (UniqueConstraint("slug", "version", name="uq_skills_slug_version"),)

    id: int | None = id_field()
    slug: str = Field(max_length=100)
    version: str = Field(default="1.0.0", max_length=20)
    description: str = Field(default="", max_length=1024)
    meta: dict[str, Any] = metadata_field()


class SOP(SoftDeleted, table=True):
    """A standard operating procedure: how an operator performs a skill."""

    __tablename__ = "sops"
    __table_args__ = (UniqueConstraint("slug", "version", name="uq_sops_slug_version"),)

    id: int | None = id_field()
    slug: str = Field(max_length=100)
    version: str = Field(default="1.0.0", max_length=20)
    description: str = Field(default="", max_length=1024)
    # Ordered skill slugs an operator performs.
    skill_sequence: list[str] = Field(default_factory=list, sa_type=JSON)
    content: str = Field(default="", sa_type=Text)
