"""Response and request models shared by routers (ids are strings in JSON)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Generic, Self, TypeVar

from fastapi import Path
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    model_validator,
)

from keystone_core.models import Role


def _to_str(value: Any) -> str:
    return str(value)


IdStr = Annotated[str, BeforeValidator(_to_str), PlainSerializer(str, return_type=str)]


MAX_ROW_ID = 2**63 - 1
# A row id in a path: positive and within BIGINT, so no database ever sees a wild number.
RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID, description="The row's numeric id.")]


# Rows store the JSON column as ``meta``; the API calls it ``metadata``.
Metadata = Annotated[dict[str, Any], Field(validation_alias=AliasChoices("meta", "metadata"))]


class PartialUpdate(BaseModel):
    """A partial update: omitted fields stay; ``null`` only where the column allows it."""

    model_config = ConfigDict(extra="forbid")
    nullable: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _no_null(self) -> Self:
        # Refused here so the 422 names the field before any database work.
        bad = sorted(
            n for n in self.model_fields_set if getattr(self, n) is None and n not in self.nullable
        )
        if bad:
            raise ValueError(f"{', '.join(bad)} cannot be null")
        return self


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=8, max_length=1024)


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "bearer"  # noqa: S105 (the OAuth2 token type)
    expires_in: int
    role: Role


class MeResponse(BaseModel):
    id: IdStr
    account: str
    role: Role
    display_name: str
    factory_ids: list[IdStr]
    data_collector_id: IdStr | None
    inspector_id: IdStr | None


class ComponentHealth(BaseModel):
    status: str = Field(description="`up` or `down`")
    detail: str = ""


class HealthResponse(BaseModel):
    status: str = Field(description="`ok` when every component is up, else `degraded`")
    components: dict[str, ComponentHealth]
    migration: dict[str, str | None]


class LiveResponse(BaseModel):
    status: str


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """Every list: one page of items and the total matching the filters."""

    items: list[T]
    total: int
    limit: int
    offset: int
