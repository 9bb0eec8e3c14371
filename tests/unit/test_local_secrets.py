"""Locally generated secrets: made once, private, reused, never silently replaced."""

from __future__ import annotations

import itertools
import json
import re
import stat
from pathlib import Path

import pytest

from keystone_core.errors import ConfigurationError
from keystone_core.local_secrets import load_or_create_secrets

counter = itertools.count()
GENERATORS = {"access_key": lambda: f"ak{next(counter)}", "secret_key": lambda: "s" * 40}


def test_secrets_are_generated_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "dev" / "secrets.json"
    first = load_or_create_secrets(path, GENERATORS)
    assert load_or_create_secrets(path, GENERATORS) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == first
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left over


def test_secrets_differ_between_files(tmp_path: Path) -> None:
    a = load_or_create_secrets(tmp_path / "a.json", GENERATORS)
    b = load_or_create_secrets(tmp_path / "b.json", GENERATORS)
    assert a["access_key"] != b["access_key"]


@pytest.mark.parametrize(
    "content",
    ["not json", "[]", '{"access_key": "AK"}', '{"access_key": "", "secret_key": "x"}'],
    ids=["garbage", "list", "missing-secret", "empty-key"],
)
def test_a_broken_secrets_file_is_a_configuration_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "secrets.json"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=re.escape(str(path))):
        load_or_create_secrets(path, GENERATORS)
    assert path.read_text() == content
