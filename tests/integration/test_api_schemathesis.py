"""Property-based API test: schemathesis drives every operation of the OpenAPI document as
an admin against the app on MariaDB; no 5xx, and every response matches its declared schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import Engine

from keystone_api.app import create_app
from keystone_core.storage import EmbeddedS3Server
from tests.conftest import make_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def api_app(
    tmp_path: Path, mariadb_migrated: str, mariadb_engine: Engine, s3_server: EmbeddedS3Server
) -> Iterator[FastAPI]:
    app = create_app(
        make_settings(
            tmp_path,
            database_url=mariadb_migrated,
            s3_endpoint_url=s3_server.endpoint_url,
            s3_access_key=s3_server.access_key,
            s3_secret_key=s3_server.secret_key,
            login_rate_per_minute=10_000,
        )
    )
    with TestClient(app):  # runs the lifespan: engine, migrations, admin account
        yield app


@pytest.fixture
def api_schema(api_app: FastAPI) -> Any:
    return schemathesis.openapi.from_asgi("/api/v1/openapi.json", api_app)


@pytest.fixture
def admin_headers(api_app: FastAPI) -> dict[str, str]:
    with TestClient(api_app) as client:
        token = client.post(
            "/api/v1/auth/login", json={"account": "admin", "password": "test-admin-password"}
        ).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_every_operation_answers_within_its_contract(
    case: Any, admin_headers: dict[str, str]
) -> None:
    if case.path == "/api/v1/auth/logout":
        return  # signing out would end the session the other cases use
    if case.path == "/api/v1/device-state/stream":
        return  # an event stream never ends (tests/contract reads it)
    case.call_and_validate(
        headers=admin_headers,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )
