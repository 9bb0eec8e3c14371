"""The one settings object (environment variables prefixed ``KEYSTONE_``)."""

from __future__ import annotations

import re
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from keystone_core.errors import ConfigurationError

ENV_PREFIX = "KEYSTONE_"
DEFAULT_SECRET_KEY = "dev-insecure-secret-key-change-me"  # noqa: S105 (refused in production)
DEFAULT_ADMIN_PASSWORD = "keystone-dev-admin"  # noqa: S105 (refused in production)
# Example files (docker/.env.example) use this prefix; production refuses such values.
PLACEHOLDER_PREFIX = "change-me"


class Environment(StrEnum):
    DEV = "dev"
    TEST = "test"
    PRODUCTION = "production"


class Settings(BaseSettings):
    """Every knob of Keystone. Read once per process through :func:`get_settings`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    env: Environment = Field(
        Environment.DEV,
        description=(
            "dev, test or production. production refuses the built-in development secrets "
            "and change-me placeholders."
        ),
    )
    data_dir: Path = Field(Path(".keystone"), description="Local state for the embedded default.")
    database_url: str = Field(
        "sqlite:///.keystone/keystone.db",
        description="SQLAlchemy URL: sqlite:///path or mysql+pymysql://user:pass@host:port/db.",
    )
    database_pool_size: int = Field(
        20,
        ge=1,
        le=200,
        description=(
            "Connections kept per process (as many again may overflow). 20 + 20 matches the "
            "40 worker threads that run database work for one API process."
        ),
    )
    database_echo: bool = Field(False, description="Log every SQL statement (debugging only).")
    migrate_on_start: bool = Field(True, description="Run migrations when the API starts.")

    secret_key: SecretStr = Field(
        SecretStr(DEFAULT_SECRET_KEY),
        description=(
            "Signs access tokens (and derives per-task callback tokens); at least 32 random "
            "characters in production. Changing it signs everybody out."
        ),
    )
    jwt_algorithm: str = Field(
        "HS256", pattern=r"^(HS256|HS384|HS512)$", description="HMAC algorithm of access tokens."
    )
    access_token_expire_minutes: int = Field(
        720, ge=1, le=60 * 24 * 30, description="Lifetime of a person's access token."
    )

    admin_account: str = Field(
        "admin",
        min_length=1,
        max_length=64,
        description="Bootstrap admin account, created (or its password reset) when the API starts.",
    )
    admin_password: SecretStr = Field(
        SecretStr(DEFAULT_ADMIN_PASSWORD),
        description="The bootstrap admin's password; must be set in production.",
    )

    s3_endpoint_url: str | None = Field(None, description="Empty means AWS's default endpoint.")
    s3_access_key: SecretStr | None = Field(
        None, description="Access key of the factory object store (also handed to devices)."
    )
    s3_secret_key: SecretStr | None = Field(None, description="Its secret key.")
    s3_region: str = Field("us-east-1", description="Region the S3 client signs for.")
    s3_bucket_prefix: str = Field(
        "edge-",
        pattern=r"^[a-z0-9][a-z0-9.-]{0,40}$",
        description="Factory buckets are named {prefix}{factory_id}.",
    )
    s3_public_endpoint_url: str | None = Field(
        None,
        description=(
            "The S3 endpoint inspectors' browsers reach, used to sign download and preview "
            "links; empty means KEYSTONE_S3_ENDPOINT_URL."
        ),
    )
    derived_prefix: str = Field(
        "_keystone/derived/",
        description=(
            "Key prefix of derived artefacts (QA previews) in a factory bucket; it must not "
            "start with a device prefix `{factory_id}/` (a number)."
        ),
    )
    presign_expires_s: int = Field(
        300, ge=1, le=3600, description="Lifetime of presigned download and preview links."
    )

    qa_auto_approve_threshold: float = Field(
        0.90,
        ge=0.0,
        le=1.0,
        description="Score at or above which QA approves an episode without an inspector.",
    )
    qa_thorough_band: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Fast scores this close to the threshold get the thorough tier.",
    )
    qa_min_duration_s: float = Field(1.0, ge=0.0, description="Default when the task sets none.")
    qa_max_gap_s: float = Field(1.0, gt=0.0, description="A topic silent longer than this fails.")
    qa_lease_minutes: int = Field(
        15,
        ge=1,
        le=24 * 60,
        description="A QA run's claim on an episode; a dead run's episodes return after it.",
    )
    qa_batch_min: int = Field(
        10, ge=1, le=10_000, description="Fewest episodes one qa_batch run is sized for."
    )
    qa_batch_max: int = Field(
        200, ge=1, le=10_000, description="Most episodes one qa_batch run claims."
    )
    qa_workers: int = Field(4, ge=1, le=64, description="Episodes scored in parallel in one run.")
    qa_max_attempts: int = Field(
        5, ge=1, le=100, description="Runs that may fail to read an object before qa_failed."
    )
    inspection_lease_minutes: int = Field(
        30, ge=1, le=24 * 60, description="How long an inspector's claim holds an episode."
    )
    orphan_grace_minutes: int = Field(
        10,
        ge=1,
        le=24 * 60,
        description=(
            "Objects in an edge bucket younger than this are left to the transfer hub; "
            "orphan_upload_sensor looks at them at a later tick."
        ),
    )
    qa_time_budget_s: float = Field(600.0, gt=0.0, description="Per episode and tier.")
    qa_preview: Literal["doubtful", "all", "off"] = Field(
        "doubtful",
        description=(
            "Which scored episodes get preview images (contact sheet, message-rate "
            "timeline): `doubtful` = needs_inspection and qa_failed, `all`, or `off`."
        ),
    )

    api_host: str = Field("127.0.0.1", description="`keystone api` bind address.")
    api_port: int = Field(8000, ge=1, le=65535, description="`keystone api` port.")
    max_request_body_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="Larger request bodies get 413."
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description='Browser origins allowed to call the API (Synapse), JSON list: ["https://…"].',
    )
    login_rate_per_minute: int = Field(
        10, ge=1, le=10_000, description="Sign-in attempts per client IP and per account."
    )
    metrics_token: SecretStr | None = Field(None, description="If set, /metrics needs it.")
    # prometheus-client's own variable (read by the library at import, hence no prefix).
    prometheus_multiproc_dir: Path | None = Field(
        None,
        validation_alias="PROMETHEUS_MULTIPROC_DIR",
        description=(
            "Directory shared by every process of one host (API workers, Dagster runs) for "
            "prometheus-client's multiprocess mode; `keystone api --workers N` sets one up."
        ),
    )
    metrics_state_cache_s: float = Field(
        5.0, ge=0, le=300, description="How long /metrics reuses one reading of the DB state."
    )

    # --- alert rules (docs/observability.md; docs/alerts/keystone.rules.yml) -------------
    alerts_interval_s: int = Field(
        60, ge=10, le=3600, description="How often the alerts sensor evaluates the rules."
    )
    alert_upload_queue_max: int = Field(
        5, ge=0, description="Warn when more tasks than this are in `uploading`."
    )
    alert_qa_failure_rate: float = Field(
        0.10, ge=0, le=1, description="Warn when the last hour's QA failure rate exceeds this."
    )
    alert_qa_min_results: int = Field(
        10, ge=1, description="QA results in the hour below which the rate is not judged."
    )
    alert_no_uploads_minutes: int = Field(
        30, ge=1, description="Critical after this long without uploads in production hours."
    )
    alert_sync_queue_max: int = Field(
        100, ge=0, description="Warn when more sync jobs than this have work left."
    )
    alert_sync_failed_max: int = Field(
        0, ge=0, description="Warn when more sync jobs than this are `failed`."
    )
    alert_stuck_leases_max: int = Field(
        0, ge=0, description="Warn when more claims than this hold an expired lease."
    )
    log_level: str = Field(
        "INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$", description="Least severe level logged."
    )
    log_format: Literal["json", "text"] = Field(
        "json",
        description=(
            "`json`: one JSON object per line (ts, level, logger, message, request_id, …) "
            "for log collectors; `text`: one readable line (`keystone dev` uses it)."
        ),
    )
    health_require_dagster: bool = Field(
        True,
        description=(
            "`/api/v1/health` reports the Dagster daemon's heartbeat (503 when it is stale); "
            "false for an API that runs without Dagster."
        ),
    )
    dagster_heartbeat_max_age_s: int = Field(
        180,
        ge=60,
        le=86_400,
        description="The daemon is `down` in /health when its last heartbeat is older.",
    )
    dagster_run_retention_days: int | None = Field(
        30,
        ge=1,
        le=3650,
        description=(
            "The daily purge_run_history job deletes finished Dagster runs (with their "
            "event logs and captured output) older than this; empty keeps them forever."
        ),
    )

    # --- Axon devices ---------------------------------------------------------------
    device_base_url: str | None = Field(
        None,
        pattern=r"^http://[^/?#\s]+$",
        description=(
            "Plain http://host[:port] the robots reach this API at (they speak no TLS). "
            "Registration endpoints (ws://…) and task callback URLs are built from it; "
            "empty = from the Host of the registration or configuring request."
        ),
    )
    enrollment_max_minutes: int = Field(
        24 * 60, ge=1, le=7 * 24 * 60, description="Longest enrollment window an admin may open."
    )
    registration_rate_per_minute: int = Field(
        30,
        ge=1,
        le=10_000,
        description="Device registrations per client IP (a factory takes ten times this).",
    )
    config_download_rate_per_minute: int = Field(
        300,
        ge=1,
        le=100_000,
        description="Config-template downloads (axon-config, no credentials) per client IP.",
    )
    device_s3_credentials: Literal["iam", "shared", "none"] = Field(
        "iam",
        description=(
            "Object-store credentials handed to a registering device: `iam` creates a key "
            "limited to the device's own `{factory_id}/{device_id}/` prefix through the "
            "store's IAM API; `shared` hands out KEYSTONE_S3_ACCESS_KEY (not prefix-scoped); "
            "`none` hands out none (configure the device by hand)."
        ),
    )
    device_token_overlap_hours: float = Field(
        24.0, ge=0, le=24 * 30, description="How long a rotated device token stays valid."
    )
    callback_token_grace_hours: float = Field(
        24.0,
        ge=0,
        le=24 * 365,
        description="A task's callback token stays valid this long after the task is final.",
    )
    callback_max_bytes: int = Field(
        1024 * 1024, ge=1024, le=16 * 1024 * 1024, description="Larger callback bodies get 413."
    )
    callback_rate_per_minute: int = Field(
        120, ge=1, le=100_000, description="Callbacks accepted per device and minute."
    )
    recorder_require_token: bool = Field(
        True,
        description=(
            "Recorder sockets must carry the device's `kws_v1_` token "
            "(`rpc.ws_client.auth_token`, filled from `{{ ws_client_auth_token }}`)."
        ),
    )
    recorder_max_frame_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024 * 1024,
        le=64 * 1024 * 1024,
        description="Recorder frames above this are closed with 1009 (the recorder's is 16 MiB).",
    )
    recorder_frame_rate_per_second: int = Field(
        200, ge=1, le=100_000, description="Frames per second one recorder socket may send."
    )
    recorder_rpc_timeout_s: float = Field(10.0, gt=0, le=600, description="Quick RPC replies.")
    recorder_finish_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="finish/cancel/quit replies (the device hashes the file)."
    )
    recorder_require_transfer: bool = Field(
        True,
        description=(
            "Refuse `config` (409 transfer_not_connected) while the device's transfer "
            "program is not connected: nothing recorded then could be uploaded."
        ),
    )
    upload_request_cooldown_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description=(
            "Wait before asking a device again for a recording it has not reported "
            "(doubling per try, at most 10 tries, then flagged for an operator)."
        ),
    )
    ack_verify: Literal["metadata", "sha256"] = Field(
        "sha256",
        description=(
            "What earns a device its upload_ack (after which it deletes its copy): "
            "`metadata` = key, size, checksum metadata = sidecar checksum, MCAP summary "
            "readable; `sha256` = that plus a re-hash of the stored MCAP by the Dagster "
            "verify_uploads job (the device uploads unsigned payloads)."
        ),
    )
    device_heartbeat_s: float = Field(
        5.0, gt=0, le=300, description="How often a worker confirms the sockets it holds."
    )

    # --- cloud sync (docs/sync.md) -------------------------------------------------------
    sync_target: Literal["s3", "http", "off"] = Field(
        "s3",
        description=(
            "Where approved episodes go: another S3 bucket/endpoint, a cloud receiver over "
            "HTTP, or nowhere (no sync jobs are queued)."
        ),
    )
    sync_s3_endpoint_url: str | None = Field(
        None, description="Target S3 endpoint; empty means the edge store's endpoint."
    )
    sync_s3_access_key: SecretStr | None = Field(
        None, description="Target S3 key; empty means the edge store's credentials."
    )
    sync_s3_secret_key: SecretStr | None = Field(
        None, description="Target S3 secret; empty means the edge store's."
    )
    sync_s3_region: str = Field("us-east-1", description="Region of the target S3 store.")
    sync_s3_bucket: str = Field(
        "keystone-cloud", pattern=r"^[a-z0-9][a-z0-9.-]{1,62}$", description="Target bucket."
    )
    sync_s3_prefix: str = Field(
        "",
        pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63}/){0,4}$",
        description="Key prefix in the target bucket (empty or ending in '/').",
    )
    sync_http_url: str | None = Field(
        None,
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        description="Cloud receiver base URL (target http), e.g. https://cloud.example.com.",
    )
    sync_http_token: SecretStr | None = Field(
        None, description="Bearer token the cloud receiver expects."
    )
    sync_http_timeout_s: float = Field(
        30.0, gt=0, le=600, description="One request to the receiver or one part upload."
    )
    sync_part_size_mib: int = Field(
        16, ge=5, le=512, description="Multipart part size; objects up to this go in one PUT."
    )
    sync_part_workers: int = Field(
        4, ge=1, le=32, description="Parts of one object uploaded in parallel."
    )
    sync_workers: int = Field(2, ge=1, le=32, description="Episodes pushed in parallel per run.")
    sync_batch_max: int = Field(50, ge=1, le=10_000, description="Jobs one sync run claims.")
    sync_max_attempts: int = Field(
        8, ge=1, le=100, description="Attempts before a sync job is failed (and alerted)."
    )
    sync_backoff_base_s: float = Field(
        2.0, gt=0, le=30, description="First retry delay; doubles per attempt, capped at 30 s."
    )
    sync_lease_minutes: int = Field(
        30, ge=1, le=24 * 60, description="A sync claim older than this is recovered."
    )
    sync_include_qa_report: bool = Field(
        True, description="Also upload the episode's QA report (qa_report.json)."
    )
    edge_retention_days: int | None = Field(
        None,
        ge=0,
        le=3650,
        description=(
            "Expire edge objects this many days after a verified sync; empty (default) keeps "
            "them forever."
        ),
    )

    # --- housekeeping (docs/runbooks/housekeeping.md) ------------------------------------
    audit_retention_days: int | None = Field(
        365,
        ge=1,
        le=36_500,
        description=(
            "The daily housekeeping job archives audit-log rows older than this to the object "
            "store and deletes them from the database; empty keeps them forever."
        ),
    )
    audit_archive: bool = Field(
        True,
        description=(
            "Write expired audit rows to KEYSTONE_AUDIT_ARCHIVE_BUCKET before deleting them; "
            "false deletes them without a copy."
        ),
    )
    audit_archive_bucket: str = Field(
        "keystone-audit-archive",
        pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        description="Bucket (in the factory object store) the audit archives go to.",
    )
    outbox_retention_days: int | None = Field(
        14,
        ge=1,
        le=3650,
        description=(
            "Housekeeping deletes events fanned out longer ago than this, with their webhook "
            "deliveries and attempts once every delivery is delivered or failed; empty keeps "
            "them forever."
        ),
    )

    # --- webhooks (docs/webhooks.md) -----------------------------------------------------
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=120, description="One webhook POST: connect, send and each read."
    )
    webhook_max_attempts: int = Field(
        10, ge=1, le=100, description="Tries of one delivery before it is failed."
    )
    webhook_backoff_base_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="First retry delay; doubles per attempt up to the cap, with jitter.",
    )
    webhook_backoff_cap_s: float = Field(
        1800.0, gt=0, le=86400, description="Longest delay between two tries of a delivery."
    )
    webhook_disable_after: int = Field(
        25,
        ge=1,
        le=10_000,
        description="Consecutive failed attempts after which a webhook is disabled.",
    )
    webhook_workers: int = Field(
        4, ge=1, le=64, description="Endpoints one deliver_webhooks run posts to in parallel."
    )
    webhook_batch_max: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Outbox events fanned out, and deliveries claimed, per pass of a run.",
    )

    @field_validator(
        "edge_retention_days",
        "dagster_run_retention_days",
        "audit_retention_days",
        "outbox_retention_days",
        mode="before",
    )
    @classmethod
    def _empty_means_none(cls, value: object) -> object:
        # `NAME=` in an env file is how an operator writes "off" for an optional period.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("s3_public_endpoint_url")
    @classmethod
    def _public_endpoint_is_a_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("derived_prefix")
    @classmethod
    def _derived_prefix_is_apart_from_device_keys(cls, value: str) -> str:
        segments = value.split("/")[:-1]
        if (
            not value.endswith("/")
            or len(value) > 200
            or not all(re.fullmatch(r"[A-Za-z0-9_.-]+", s) for s in segments)
            or any(s in {".", ".."} for s in segments)
        ):
            raise ValueError(
                "must be path segments of letters, digits, '_', '.', '-', each ending in '/' "
                "(e.g. _keystone/derived/)"
            )
        if segments[0].isdigit():
            raise ValueError("must not start with a number: devices write under {factory_id}/")
        return value

    @model_validator(mode="after")
    def _refuse_default_secrets_in_production(self) -> Settings:
        if self.env is not Environment.PRODUCTION:
            return self
        secret = self.secret_key.get_secret_value()
        if (
            not secret
            or secret == DEFAULT_SECRET_KEY
            or len(secret) < 32
            or secret.startswith(PLACEHOLDER_PREFIX)
        ):
            raise ValueError(
                f"{ENV_PREFIX}SECRET_KEY must be set to a random value of at least 32 "
                "characters in production"
            )
        password = self.admin_password.get_secret_value()
        if (
            not password
            or password == DEFAULT_ADMIN_PASSWORD
            or password.startswith(PLACEHOLDER_PREFIX)
        ):
            raise ValueError(f"{ENV_PREFIX}ADMIN_PASSWORD must be set in production")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def bucket_for_factory(self, factory_id: str) -> str:
        """The edge bucket of one factory (``s3://edge-{factory_id}/`` by default)."""
        return f"{self.s3_bucket_prefix}{factory_id}".lower()


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning validation errors into one readable ConfigurationError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        parts = []
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            name = f"{ENV_PREFIX}{field.upper()}" if field else "settings"
            message = str(error["msg"]).removeprefix("Value error, ")
            parts.append(f"{name}: {message}" if field else message)
        raise ConfigurationError("invalid configuration: " + "; ".join(parts)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached); tests call ``get_settings.cache_clear()``."""
    return load_settings()
