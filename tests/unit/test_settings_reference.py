"""docs/configuration.md is generated from the settings and names only real variables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import Field

from keystone_cli.config_reference import (
    DOC_PATH,
    env_name,
    render,
    section_of,
    undocumented,
    unsectioned,
)
from keystone_core.settings import ENV_PREFIX, Settings
from keystone_receiver.settings import ENV_PREFIX as RECEIVER_PREFIX
from keystone_receiver.settings import ReceiverSettings

ROOT = Path(__file__).resolve().parents[2]
KEYSTONE_VAR = re.compile(r"\bKEYSTONE_[A-Z0-9_]*[A-Z0-9]\b")
# Named in docs but read by the test suite, not by Keystone.
NOT_SETTINGS = {
    "KEYSTONE_TEST_DATABASE",
    "KEYSTONE_TEST_MARIADB_HOST",
    "KEYSTONE_TEST_MARIADB_PORT",
    "KEYSTONE_TEST_MARIADB_USER",
    "KEYSTONE_TEST_MARIADB_PASSWORD",
}


def real_variables() -> set[str]:
    names = {env_name(ENV_PREFIX, n, f) for n, f in Settings.model_fields.items()}
    names |= {env_name(RECEIVER_PREFIX, n, f) for n, f in ReceiverSettings.model_fields.items()}
    return names


def test_every_setting_has_a_description() -> None:
    assert undocumented(Settings) == []
    assert undocumented(ReceiverSettings) == []


def test_every_setting_belongs_to_a_section() -> None:
    assert unsectioned() == []


def test_an_undocumented_setting_stops_the_generator() -> None:
    class Extended(Settings):
        brand_new_knob: int = 3
        documented_knob: int = Field(3, description="Has one.")

    assert undocumented(Extended) == ["brand_new_knob"]
    assert section_of("brand_new_knob") is None


def test_the_reference_is_up_to_date() -> None:
    assert DOC_PATH.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is out of date: run "
        "`.tools/bin/uv run keystone config-reference > docs/configuration.md`"
    )


def test_the_reference_lists_every_variable_once() -> None:
    text = render()
    for name in real_variables():
        assert text.count(f"| `{name}` |") == 1, name
    assert "keystone-dev-admin" not in text  # dev secrets are never printed
    assert "dev-insecure-secret-key" not in text


@pytest.mark.parametrize(
    "path",
    sorted(
        [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")],
        key=str,
    ),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_docs_name_only_real_variables(path: Path) -> None:
    named = set(KEYSTONE_VAR.findall(path.read_text(encoding="utf-8")))
    # A family written as `KEYSTONE_SYNC_S3_*` or `KEYSTONE_RECEIVER_…` is a prefix.
    text = path.read_text(encoding="utf-8")
    prefixes = {m.rstrip("_") for m in re.findall(r"\bKEYSTONE_[A-Z0-9_]*_(?=[*…])", text)}
    unknown = named - real_variables() - NOT_SETTINGS - prefixes
    assert not unknown, f"{path.name} names variables Keystone does not read: {sorted(unknown)}"
