"""Secrets generated once for a local installation and kept in a private JSON file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from keystone_core.errors import ConfigurationError


def load_or_create_secrets(
    path: Path, generators: Mapping[str, Callable[[], str]]
) -> dict[str, str]:
    """The secrets stored at ``path``, generated with ``generators`` on first use.

    Local data (the embedded S3 store, issued tokens) outlives one run, so its keys are
    made once and reused. The file is created with mode 0600 and published with a hard
    link, so two processes starting at once agree on one set and nobody ever reads a
    half-written file. A damaged file is an error, never silently replaced: data made
    with the old keys would become unreadable.
    """
    with contextlib.suppress(FileNotFoundError):
        return _read(path, generators)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {name: make() for name, make in generators.items()}
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as tmp:
            json.dump(values, tmp, indent=2)
            tmp.write("\n")
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            return _read(path, generators)
    finally:
        os.unlink(tmp_name)
    return values


def _read(path: Path, generators: Mapping[str, Callable[[], str]]) -> dict[str, str]:
    text = path.read_text()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} is not a secrets file (delete it to generate new ones)")
    values: dict[str, str] = {}
    for name in generators:
        value = data.get(name)
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"{path} lacks a value for {name!r}")
        values[name] = value
    return values
