"""The receiver's one settings object (environment variables prefixed ``KEYSTONE_RECEIVER_``)."""

from __future__ import annotations

import re

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "KEYSTONE_RECEIVER_"
MIB = 1024 * 1024
GIB = 1024 * MIB
# S3's own limits: parts other than the last are at least 5 MiB, one PUT or part at most
# 5 GiB, and SigV4 presigned URLs live at most 7 days.
MIN_PART_SIZE = 5 * MIB
MAX_PART_SIZE = 5 * GIB
MAX_PRESIGN_EXPIRES_S = 7 * 24 * 3600
# Ceiling on the objects of one episode; ``max_objects`` picks the working limit below it.
MAX_OBJECTS_CEILING = 1000
MIN_TOKEN_LENGTH = 16
_ENDPOINT = re.compile(r"https?://[^\s/?#]+/?")


class ReceiverSettingsError(Exception):
    """The settings are invalid; the message names every bad variable on one line."""


class ReceiverSettings(BaseSettings):
    """Every knob of the cloud receiver. Invalid values raise pydantic's ValidationError."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    database_url: str = Field(
        "sqlite:///.keystone/receiver.db",
        description="SQLAlchemy URL: sqlite:///path or mysql+pymysql://user:pass@host:port/db.",
    )
    database_pool_size: int = Field(10, ge=1, le=200, description="Connections per process.")

    s3_endpoint_url: str | None = Field(None, description="Empty means AWS's default endpoint.")
    public_s3_endpoint_url: str | None = Field(
        None,
        description=(
            "Host the presigned URLs name, for senders that reach the store through NAT or a "
            "proxy; empty means s3_endpoint_url."
        ),
    )
    s3_access_key: SecretStr | None = Field(None, description="Access key of the cloud store.")
    s3_secret_key: SecretStr | None = Field(None, description="Its secret key.")
    s3_region: str = Field(
        "us-east-1", pattern=r"^[a-z0-9-]{1,32}$", description="Region the S3 client signs for."
    )
    bucket: str = Field(
        "keystone-cloud",
        pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        description="Where received episodes are stored; created at start-up if missing.",
    )

    token: SecretStr | None = Field(
        None, description=f"Bearer token senders present (at least {MIN_TOKEN_LENGTH} chars)."
    )
    allow_anonymous: bool = Field(
        False, description="Development only: accept requests without a token if none is set."
    )

    multipart_threshold: int = Field(
        16 * MIB,
        ge=0,
        le=MAX_PART_SIZE,
        description="Objects up to this size get one presigned PUT; larger ones multipart.",
    )
    part_size: int = Field(
        16 * MIB,
        ge=MIN_PART_SIZE,
        le=MAX_PART_SIZE,
        description="Multipart part size (raised per object to stay within 10,000 parts).",
    )
    presign_expires_s: int = Field(
        3600,
        ge=60,
        le=MAX_PRESIGN_EXPIRES_S,
        description="Lifetime of the presigned upload URLs handed to a sender.",
    )
    max_objects: int = Field(16, ge=1, le=MAX_OBJECTS_CEILING, description="Objects per episode.")
    log_level: str = Field(
        "INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$", description="Least severe level logged."
    )

    @field_validator("s3_endpoint_url", "public_s3_endpoint_url")
    @classmethod
    def _endpoint_is_a_host_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        # Path-style presigned URLs sign "/{bucket}/{key}"; a path prefix on the endpoint
        # would be signed too and break behind proxies that strip it, so only a host is allowed.
        if not _ENDPOINT.fullmatch(value):
            raise ValueError("must be http(s)://host[:port] without a path")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _refuse_to_run_open(self) -> ReceiverSettings:
        if self.token is None:
            if not self.allow_anonymous:
                raise ValueError(
                    f"{ENV_PREFIX}TOKEN is not set: senders must present a bearer token. "
                    f"Set it (at least {MIN_TOKEN_LENGTH} random characters), or set "
                    f"{ENV_PREFIX}ALLOW_ANONYMOUS=true for development only"
                )
        elif len(self.token.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(f"{ENV_PREFIX}TOKEN must be at least {MIN_TOKEN_LENGTH} characters")
        return self

    @property
    def presign_endpoint_url(self) -> str | None:
        """The endpoint presigned URLs point at."""
        return self.public_s3_endpoint_url or self.s3_endpoint_url

    @property
    def requires_token(self) -> bool:
        return self.token is not None


def load_receiver_settings(**overrides: object) -> ReceiverSettings:
    """Settings from the environment and ``overrides``; errors become one readable line."""
    try:
        return ReceiverSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        parts = []
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            parts.append(f"{ENV_PREFIX}{field.upper()}: {message}" if field else message)
        raise ReceiverSettingsError("invalid receiver configuration: " + "; ".join(parts)) from None
