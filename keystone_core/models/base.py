"""Column helpers shared by every table: big-int ids, aware UTC timestamps, soft delete."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from sqlalchemy import JSON, BigInteger, Column, Double, Enum, Integer
from sqlmodel import Field, SQLModel

from keystone_core import clock
from keystone_core.db import UTCDateTime

# BIGINT on MySQL; SQLite only autoincrements a column declared exactly INTEGER.
IdType = BigInteger().with_variant(Integer(), "sqlite")


def id_field() -> Any:
    return Field(default=None, primary_key=True, sa_type=IdType)


OnDelete = Literal["CASCADE", "SET NULL", "RESTRICT"]


def fk_field(
    target: str, *, nullable: bool = False, index: bool = True, ondelete: OnDelete = "RESTRICT"
) -> Any:
    """A foreign key to ``target`` ("table.id"); RESTRICT by default so deletes need guards."""
    default: Any = None if nullable else ...
    return Field(
        default=default,
        foreign_key=target,
        sa_type=IdType,
        index=index,
        nullable=nullable,
        ondelete=ondelete,
    )


def utc_field(*, nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_type=UTCDateTime, nullable=nullable, index=index)


def created_field() -> Any:
    return Field(default_factory=clock.now, sa_type=UTCDateTime, nullable=False, index=True)


def updated_field() -> Any:
    return Field(default_factory=clock.now, sa_type=UTCDateTime, nullable=False)


class Timestamped(SQLModel):
    """``created_at`` / ``updated_at`` in aware UTC with microseconds."""

    created_at: datetime = created_field()
    updated_at: datetime = updated_field()


class SoftDeleted(Timestamped):
    """Rows whose history matters are hidden, not deleted."""

    deleted_at: datetime | None = utc_field(index=True)


def enum_field(enum_cls: type[StrEnum], default: Any = ..., *, index: bool = False) -> Any:
    """Store an enum's *value* in a VARCHAR (portable, readable, cheap to extend)."""
    return Field(
        default=default,
        sa_type=Enum(
            enum_cls,
            native_enum=False,
            create_constraint=False,
            length=32,
            values_callable=lambda members: [m.value for m in members],
            validate_strings=True,
        ),
        index=index,
    )


def double_field(*, nullable: bool = True, ge: float | None = None, le: float | None = None) -> Any:
    """A double-precision float (MySQL FLOAT is single precision)."""
    return Field(
        default=None if nullable else ..., sa_type=Double(), ge=ge, le=le, nullable=nullable
    )


def metadata_field() -> Any:
    """A JSON ``metadata`` column (the attribute is ``meta``: SQLModel owns ``metadata``)."""
    return Field(
        default_factory=dict,
        sa_column=Column("metadata", JSON, nullable=False),
        alias="metadata",
    )
