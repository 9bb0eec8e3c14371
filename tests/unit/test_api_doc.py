"""docs/api.md lists exactly the routes and roles of keystone_api.access.ROUTE_ACCESS."""

from __future__ import annotations

import re
from pathlib import Path

from keystone_api.access import ROUTE_ACCESS, Device, Public

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
ROW = re.compile(r"^\| `(GET|POST|PUT|PATCH|DELETE)` \| `([^`]+)` \| ([^|]+) \|$")


def test_the_route_table_in_the_api_doc_matches_the_code() -> None:
    documented = {}
    for line in DOC.read_text().splitlines():
        match = ROW.match(line)
        if match:
            method, path, roles = match.groups()
            documented[(method, path)] = roles.strip()
    expected = {
        key: "public"
        if isinstance(rule, Public)
        else "device or task token"
        if isinstance(rule, Device)
        else ", ".join(sorted(r.value for r in rule))
        for key, rule in ROUTE_ACCESS.items()
    }
    assert documented == expected
