"""Dagster resources over Keystone's one settings object, engine factory and S3 factory."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING

from dagster import ConfigurableResource
from sqlalchemy import Engine
from sqlmodel import Session

from keystone_core.db import create_db_engine, session_scope
from keystone_core.settings import Settings, load_settings
from keystone_core.storage import create_s3_client

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class KeystoneDatabase(ConfigurableResource):  # type: ignore[type-arg]
    """Keystone's settings, database and object store as configured by ``KEYSTONE_*``
    (the database URL and object store can be overridden, e.g. by tests)."""

    database_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None

    @cached_property
    def settings(self) -> Settings:
        names = ("database_url", "s3_endpoint_url", "s3_access_key", "s3_secret_key")
        overrides = {n: getattr(self, n) for n in names if getattr(self, n)}
        return load_settings(**overrides)

    @cached_property
    def engine(self) -> Engine:
        return create_db_engine(self.settings)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.engine) as session:
            yield session


class KeystoneObjectStore(ConfigurableResource):  # type: ignore[type-arg]
    """The factory object store (S3 API) as configured by ``KEYSTONE_S3_*``; the endpoint
    and keys can be overridden (tests, a second store)."""

    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = None

    @cached_property
    def settings(self) -> Settings:
        overrides = {
            name: value
            for name, value in (
                ("s3_endpoint_url", self.endpoint_url),
                ("s3_access_key", self.access_key),
                ("s3_secret_key", self.secret_key),
            )
            if value
        }
        return load_settings(**overrides)

    @cached_property
    def client(self) -> S3Client:
        return create_s3_client(self.settings)
