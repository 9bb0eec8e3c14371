"""Settings: documented defaults, KEYSTONE_ variables, refusals that name the variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keystone_core.errors import ConfigurationError
from keystone_core.settings import (
    DEFAULT_ADMIN_PASSWORD,
    DEFAULT_SECRET_KEY,
    Environment,
    get_settings,
    load_settings,
)

STRONG_SECRET = "a-production-secret-key-0123456789abcdef"
STRONG_PASSWORD = "a-real-admin-password"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No KEYSTONE_ variable of the machine running the tests may leak into them."""
    for name in list(os.environ):
        if name.startswith("KEYSTONE_"):
            monkeypatch.delenv(name)


def refusal(**overrides: object) -> str:
    with pytest.raises(ConfigurationError) as refused:
        load_settings(**overrides)
    assert refused.value.code == "configuration_error"
    return refused.value.message


def test_defaults() -> None:
    settings = load_settings()
    assert settings.env is Environment.DEV
    assert settings.admin_account == "admin"
    assert settings.admin_password.get_secret_value() == DEFAULT_ADMIN_PASSWORD
    assert settings.secret_key.get_secret_value() == DEFAULT_SECRET_KEY
    assert settings.s3_bucket_prefix == "edge-"
    assert settings.qa_auto_approve_threshold == pytest.approx(0.90)
    assert settings.jwt_algorithm == "HS256"
    assert settings.database_url.startswith("sqlite:///")
    assert settings.is_sqlite
    assert settings.migrate_on_start


def test_the_default_edge_bucket_is_per_factory() -> None:
    settings = load_settings()
    assert settings.bucket_for_factory("F42") == "edge-f42"
    assert load_settings(s3_bucket_prefix="site.").bucket_for_factory("a") == "site.a"


def test_secrets_do_not_show_in_repr() -> None:
    settings = load_settings(secret_key=STRONG_SECRET, admin_password=STRONG_PASSWORD)
    assert STRONG_SECRET not in repr(settings)
    assert STRONG_PASSWORD not in repr(settings)


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KEYSTONE_ENV", "test")
    monkeypatch.setenv("KEYSTONE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("KEYSTONE_DATABASE_URL", "mysql+pymysql://k:p@db:3306/keystone")
    monkeypatch.setenv("KEYSTONE_QA_AUTO_APPROVE_THRESHOLD", "0.75")
    monkeypatch.setenv("KEYSTONE_ADMIN_ACCOUNT", "root-admin")
    monkeypatch.setenv("KEYSTONE_ACCESS_TOKEN_EXPIRE_MINUTES", "15")
    monkeypatch.setenv("KEYSTONE_MIGRATE_ON_START", "false")
    settings = load_settings()
    assert settings.env is Environment.TEST
    assert settings.data_dir == tmp_path
    assert settings.database_url == "mysql+pymysql://k:p@db:3306/keystone"
    assert not settings.is_sqlite
    assert settings.qa_auto_approve_threshold == pytest.approx(0.75)
    assert settings.admin_account == "root-admin"
    assert settings.access_token_expire_minutes == 15
    assert settings.migrate_on_start is False


def test_variables_without_the_prefix_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADMIN_ACCOUNT", "not-me")
    monkeypatch.setenv("KEYSTONE_SOMETHING_UNKNOWN", "1")
    assert load_settings().admin_account == "admin"


def test_explicit_values_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSTONE_ADMIN_ACCOUNT", "from-env")
    assert load_settings(admin_account="explicit").admin_account == "explicit"


def test_get_settings_is_cached_until_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSTONE_ADMIN_ACCOUNT", "first")
    first = get_settings()
    monkeypatch.setenv("KEYSTONE_ADMIN_ACCOUNT", "second")
    assert get_settings() is first
    get_settings.cache_clear()
    assert get_settings().admin_account == "second"


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.admin_account = "changed"  # type: ignore[misc]


def test_production_with_strong_secrets_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSTONE_ENV", "production")
    monkeypatch.setenv("KEYSTONE_SECRET_KEY", STRONG_SECRET)
    monkeypatch.setenv("KEYSTONE_ADMIN_PASSWORD", STRONG_PASSWORD)
    settings = load_settings()
    assert settings.env is Environment.PRODUCTION
    assert settings.secret_key.get_secret_value() == STRONG_SECRET


def test_production_refuses_the_default_secret_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSTONE_ENV", "production")
    monkeypatch.setenv("KEYSTONE_ADMIN_PASSWORD", STRONG_PASSWORD)
    message = refusal()
    assert "KEYSTONE_SECRET_KEY" in message
    assert DEFAULT_SECRET_KEY not in message


@pytest.mark.parametrize("weak", ["", "short-but-not-default", DEFAULT_SECRET_KEY])
def test_production_refuses_weak_secret_keys(weak: str) -> None:
    message = refusal(env="production", secret_key=weak, admin_password=STRONG_PASSWORD)
    assert "KEYSTONE_SECRET_KEY" in message


def test_production_refuses_the_default_admin_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSTONE_ENV", "production")
    monkeypatch.setenv("KEYSTONE_SECRET_KEY", STRONG_SECRET)
    message = refusal()
    assert "KEYSTONE_ADMIN_PASSWORD" in message
    assert DEFAULT_ADMIN_PASSWORD not in message
    assert "KEYSTONE_SECRET_KEY" not in message


def test_production_refuses_an_empty_admin_password() -> None:
    message = refusal(env="production", secret_key=STRONG_SECRET, admin_password="")
    assert "KEYSTONE_ADMIN_PASSWORD" in message


@pytest.mark.parametrize("env", ["dev", "test"])
def test_dev_and_test_accept_the_default_secrets(env: str) -> None:
    assert load_settings(env=env).secret_key.get_secret_value() == DEFAULT_SECRET_KEY


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KEYSTONE_QA_AUTO_APPROVE_THRESHOLD", "2"),
        ("KEYSTONE_QA_AUTO_APPROVE_THRESHOLD", "-0.1"),
        ("KEYSTONE_QA_AUTO_APPROVE_THRESHOLD", "high"),
        ("KEYSTONE_API_PORT", "70000"),
        ("KEYSTONE_DATABASE_POOL_SIZE", "0"),
        ("KEYSTONE_JWT_ALGORITHM", "none"),
        ("KEYSTONE_LOG_LEVEL", "LOUD"),
        ("KEYSTONE_S3_BUCKET_PREFIX", "Edge_"),
        ("KEYSTONE_ENV", "staging"),
        ("KEYSTONE_ADMIN_ACCOUNT", ""),
        ("KEYSTONE_QA_PREVIEW", "sometimes"),
        ("KEYSTONE_PRESIGN_EXPIRES_S", "3601"),
        ("KEYSTONE_PRESIGN_EXPIRES_S", "0"),
        ("KEYSTONE_S3_PUBLIC_ENDPOINT_URL", "s3.example.com"),
        ("KEYSTONE_DERIVED_PREFIX", "derived"),
        ("KEYSTONE_DERIVED_PREFIX", "/derived/"),
        ("KEYSTONE_DERIVED_PREFIX", "a/../b/"),
        # Devices write under {factory_id}/ (a number): derived objects must stay apart.
        ("KEYSTONE_DERIVED_PREFIX", "12/derived/"),
    ],
)
def test_an_invalid_value_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    message = refusal()
    assert message.startswith("invalid configuration: ")
    assert f"{variable}:" in message


def test_every_invalid_variable_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSTONE_API_PORT", "0")
    monkeypatch.setenv("KEYSTONE_QA_AUTO_APPROVE_THRESHOLD", "2")
    message = refusal()
    assert "KEYSTONE_API_PORT" in message
    assert "KEYSTONE_QA_AUTO_APPROVE_THRESHOLD" in message


def test_preview_and_link_defaults() -> None:
    settings = load_settings()
    assert settings.qa_preview == "doubtful"
    assert settings.derived_prefix == "_keystone/derived/"
    assert settings.presign_expires_s == 300
    assert settings.s3_public_endpoint_url is None  # links are signed for s3_endpoint_url
    assert load_settings(s3_public_endpoint_url="").s3_public_endpoint_url is None
    assert load_settings(derived_prefix="qa-previews/").derived_prefix == "qa-previews/"
