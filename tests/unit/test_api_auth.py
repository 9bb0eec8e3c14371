"""Auth API: login, /me, token failures, error bodies, body limit, route role lists."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import jwt
import pytest
from fastapi.testclient import TestClient

from keystone_api.access import ROUTE_ACCESS, Device, Public
from keystone_api.app import check_access_table, create_app
from keystone_core import clock
from keystone_core.db import create_db_engine, session_scope
from keystone_core.models import Factory, Organization, Role
from keystone_core.services.accounts import create_user
from keystone_core.services.audit import Actor
from keystone_core.settings import Settings
from tests.conftest import make_settings

ADMIN_PASSWORD = "test-admin-password"


@pytest.fixture
def api_settings(tmp_path: Path) -> Settings:
    # Nothing listens on port 1: the object store is "down" for these tests.
    return make_settings(
        tmp_path,
        s3_endpoint_url="http://127.0.0.1:1",
        s3_access_key="k",
        s3_secret_key="s",
        max_request_body_bytes=4096,
    )


@pytest.fixture
def client(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings)) as c:
        yield c


def login(client: TestClient, account: str, password: str) -> str:
    response = client.post("/api/v1/auth/login", json={"account": account, "password": password})
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def test_login_returns_a_bearer_token_for_the_bootstrap_admin(client: TestClient) -> None:
    response = client.post(
        "/api/v1/auth/login", json={"account": "admin", "password": ADMIN_PASSWORD}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["role"] == "admin"
    assert body["expires_in"] == 720 * 60
    me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status_code == 200
    assert me.json()["account"] == "admin"
    assert me.json()["role"] == "admin"
    assert me.json()["factory_ids"] == []
    assert isinstance(me.json()["id"], str)


def test_wrong_password_and_unknown_account_get_the_same_401(client: TestClient) -> None:
    wrong = client.post("/api/v1/auth/login", json={"account": "admin", "password": "nope-nope"})
    unknown = client.post("/api/v1/auth/login", json={"account": "ghost", "password": "nope-nope"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert wrong.json()["code"] == "invalid_credentials"


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_token"),
        ({"Authorization": "Bearer garbage"}, "invalid_token"),
        ({"Authorization": "Basic YWRtaW46eA=="}, "missing_token"),
    ],
)
def test_me_without_a_valid_token_is_401(
    client: TestClient, headers: dict[str, str], code: str
) -> None:
    response = client.get("/api/v1/auth/me", headers=headers)
    assert response.status_code == 401
    assert response.json()["code"] == code
    assert "message" in response.json()


def test_expired_and_foreign_tokens_are_401(client: TestClient, api_settings: Settings) -> None:
    token = login(client, "admin", ADMIN_PASSWORD)
    with clock.frozen(clock.now() + timedelta(days=2)):
        expired = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert expired.status_code == 401
    assert expired.json()["code"] == "token_expired"
    forged = jwt.encode(
        {"sub": "1", "role": "admin", "exp": 4102444800, "jti": "x"},
        "another-key-of-sufficient-length-0123456789",
        "HS256",
    )
    response = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401
    assert response.json()["code"] == "invalid_token"


def test_scoped_user_token_carries_its_factories(
    client: TestClient, api_settings: Settings
) -> None:
    engine = create_db_engine(api_settings)
    with session_scope(engine) as session:
        org = Organization(name="O", slug="o")
        session.add(org)
        session.flush()
        factory = Factory(organization_id=org.id, name="F", slug="f")  # type: ignore[arg-type]
        session.add(factory)
        session.flush()
        assert factory.id is not None
        factory_id = factory.id
        create_user(
            session,
            account="pm",
            password="pm-password-1",
            role=Role.PRODUCTION_MANAGER,
            factory_ids=[factory_id],
            actor=Actor.system(),
        )
    engine.dispose()
    token = login(client, "pm", "pm-password-1")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["role"] == "production_manager"
    assert claims["factory_ids"] == [factory_id]
    assert claims["jti"]
    assert claims["exp"]
    assert claims["sub"]
    me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.json()["factory_ids"] == [str(factory_id)]


def test_malformed_json_is_422_with_a_stable_code(client: TestClient) -> None:
    response = client.post(
        "/api/v1/auth/login",
        content=b'{"account": "admin", "password": ',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_json"


def test_missing_and_wrongly_typed_fields_are_422_with_field_errors(client: TestClient) -> None:
    response = client.post("/api/v1/auth/login", json={"account": 5})
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "validation_error"
    locations = {tuple(err["loc"]) for err in body["detail"]}
    assert ("body", "password") in locations
    assert ("body", "account") in locations


def test_oversized_body_is_413(client: TestClient) -> None:
    big = {"account": "admin", "password": "x" * 10_000}
    response = client.post("/api/v1/auth/login", json=big)
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"


def test_oversized_chunked_body_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"account": "admin", "password": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    response = client.post(
        "/api/v1/auth/login", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413


def test_unknown_route_is_404_json(client: TestClient) -> None:
    response = client.get("/api/v1/nope")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    echoed = client.get("/api/v1/health/live", headers={"X-Request-ID": "abc123"})
    assert echoed.headers["x-request-id"] == "abc123"
    generated = client.get("/api/v1/health/live")
    assert len(generated.headers["x-request-id"]) == 32


def test_health_is_503_when_the_object_store_is_down(client: TestClient) -> None:
    response = client.get("/api/v1/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert body["components"]["database"]["status"] == "up"
    assert body["components"]["migrations"]["status"] == "up"
    assert body["components"]["object_store"]["status"] == "down"
    assert body["migration"]["current"] == body["migration"]["head"]


def test_liveness_needs_no_dependencies(client: TestClient) -> None:
    assert client.get("/api/v1/health/live").json() == {"status": "ok"}


def test_metrics_expose_request_counts_by_route_template(client: TestClient) -> None:
    client.get("/api/v1/health/live")
    text = client.get("/metrics").text
    assert "keystone_http_requests_total" in text
    assert 'route="/api/v1/health/live"' in text
    assert "keystone_http_request_duration_seconds_bucket" in text


def test_metrics_token_protects_metrics(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, metrics_token="scrape-me")
    with TestClient(create_app(settings)) as c:
        assert c.get("/metrics").status_code == 401
        ok = c.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert ok.status_code == 200


def test_the_open_routes_are_exactly_the_designed_ones() -> None:
    """DESIGN.md: every route needs a role list except health, login, metrics and the two
    that axon-config calls without credentials (registration, config download); the
    recorder's callbacks carry a device or task token checked by their handler."""
    public = {key for key, rule in ROUTE_ACCESS.items() if isinstance(rule, Public)}
    assert public == {
        ("POST", "/api/v1/auth/login"),
        ("GET", "/api/v1/health"),
        ("GET", "/api/v1/health/live"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/robot_types/{id}/configs/{filename}"),
        ("POST", "/api/v1/devices/register"),
    }
    device = {key for key, rule in ROUTE_ACCESS.items() if isinstance(rule, Device)}
    assert device == {("POST", "/api/v1/callbacks/start"), ("POST", "/api/v1/callbacks/finish")}


def test_an_app_with_a_route_lacking_an_access_rule_refuses_to_build(
    api_settings: Settings,
) -> None:
    app = create_app(api_settings)
    app.add_api_route("/api/v1/forgotten", lambda: {}, methods=["GET"])
    with pytest.raises(RuntimeError, match="/api/v1/forgotten"):
        check_access_table(app)


def test_openapi_declares_error_responses(client: TestClient) -> None:
    spec = client.get("/api/v1/openapi.json").json()
    login_responses = spec["paths"]["/api/v1/auth/login"]["post"]["responses"]
    assert {"200", "401", "422"} <= set(login_responses)


def test_logout_revokes_the_token_until_it_expires(client: TestClient) -> None:
    token = login(client, "admin", ADMIN_PASSWORD)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post("/api/v1/auth/logout", headers=headers).status_code == 204
    after = client.get("/api/v1/auth/me", headers=headers)
    assert after.status_code == 401
    assert after.json()["code"] == "token_revoked"
    fresh = login(client, "admin", ADMIN_PASSWORD)
    assert client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {fresh}"}).is_success


def test_password_change_needs_the_current_password(client: TestClient) -> None:
    headers = {"Authorization": f"Bearer {login(client, 'admin', ADMIN_PASSWORD)}"}
    wrong = client.post(
        "/api/v1/auth/password",
        json={"current_password": "not-it", "new_password": "new-password-1"},
        headers=headers,
    )
    assert wrong.status_code == 401
    short = client.post(
        "/api/v1/auth/password",
        json={"current_password": ADMIN_PASSWORD, "new_password": "short"},
        headers=headers,
    )
    assert short.status_code == 422
    ok = client.post(
        "/api/v1/auth/password",
        json={"current_password": ADMIN_PASSWORD, "new_password": "new-password-1"},
        headers=headers,
    )
    assert ok.status_code == 204
    login(client, "admin", "new-password-1")
    old = client.post("/api/v1/auth/login", json={"account": "admin", "password": ADMIN_PASSWORD})
    assert old.status_code == 401


def test_login_is_rate_limited_with_retry_after(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, login_rate_per_minute=3)
    with TestClient(create_app(settings)) as c:
        for _ in range(3):
            response = c.post("/api/v1/auth/login", json={"account": "x", "password": "y"})
            assert response.status_code == 401
        limited = c.post("/api/v1/auth/login", json={"account": "admin", "password": "y"})
        assert limited.status_code == 429
        assert limited.json()["code"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 60


def test_cors_admits_only_configured_origins(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, cors_origins=["https://synapse.example"])
    with TestClient(create_app(settings)) as c:
        preflight = {"Access-Control-Request-Method": "GET"}
        allowed = c.options(
            "/api/v1/auth/me", headers={"Origin": "https://synapse.example", **preflight}
        )
        assert allowed.headers["access-control-allow-origin"] == "https://synapse.example"
        refused = c.options(
            "/api/v1/auth/me", headers={"Origin": "https://evil.example", **preflight}
        )
        assert "access-control-allow-origin" not in refused.headers


def test_openapi_marks_only_the_open_routes_as_needing_no_token(client: TestClient) -> None:
    spec = client.get("/api/v1/openapi.json").json()
    assert spec["paths"]["/api/v1/auth/login"]["post"]["security"] == []
    assert spec["paths"]["/api/v1/health"]["get"]["security"] == []
    assert spec["paths"]["/api/v1/auth/me"]["get"]["security"] != []
