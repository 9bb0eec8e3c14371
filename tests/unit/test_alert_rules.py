"""docs/alerts/keystone.rules.yml: valid Prometheus rules (every expression parsed as
PromQL), every Keystone rule mirrored with its severity and its default threshold, and no
expression reading a metric Keystone does not export."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from keystone_core import metrics
from keystone_core.services.alerts import RULES
from keystone_core.services.signals import FactorySignals
from keystone_core.settings import Settings

RULES_FILE = Path(__file__).resolve().parents[2] / "docs" / "alerts" / "keystone.rules.yml"
DURATION = re.compile(r"^\d+(ms|s|m|h|d|w|y)$")


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES_FILE.read_text())
    assert set(document) == {"groups"}
    rules: list[dict[str, Any]] = []
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "rules"}
        assert group["name"]
        rules.extend(group["rules"])
    return rules


def _exported_names() -> set[str]:
    """Every sample name Keystone's exporters can produce."""
    names = {fam.name for fam in metrics.state_families([FactorySignals(1, "f")])}
    names.add("keystone_state_up")
    from prometheus_client import REGISTRY

    import keystone_api.middleware
    import keystone_api.ws.recorder  # noqa: F401
    import keystone_core.services.webhooks  # noqa: F401

    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
    return names


def test_every_rule_is_well_formed_promql() -> None:
    rules = _rules()
    assert rules
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"[A-Z][A-Za-z]+", rule["alert"])
        promql_parser.parse(rule["expr"])  # raises on a syntax error
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
        if "for" in rule:
            assert DURATION.match(rule["for"])


def test_the_parser_refuses_broken_promql() -> None:
    with pytest.raises(ValueError, match="parenthesis"):
        promql_parser.parse("sum by (factory (keystone_upload_queue_depth")


def test_every_keystone_rule_is_mirrored_with_its_default_threshold() -> None:
    settings = Settings()
    mirrored = {r["labels"]["keystone_rule"]: r for r in _rules() if "keystone_rule" in r["labels"]}
    assert set(mirrored) == {rule.name for rule in RULES}
    for rule in RULES:
        prometheus = mirrored[rule.name]
        assert prometheus["labels"]["severity"] == rule.severity.value
        # The first comparison in the expression is the rule's threshold.
        found = re.search(r"\s>\s*([0-9.]+)", prometheus["expr"])
        assert found, rule.name
        assert float(found.group(1)) == pytest.approx(float(rule.threshold(settings))), rule.name
        assert "for" not in prometheus  # Keystone's sensor fires on the first evaluation too


def test_the_qa_rule_judges_from_the_same_minimum_of_results() -> None:
    expr = next(r for r in _rules() if r["labels"].get("keystone_rule") == "qa_failure_rate_high")
    found = re.search(r">=\s*(\d+)", expr["expr"])
    assert found
    assert int(found.group(1)) == Settings().alert_qa_min_results


def test_rules_read_only_metrics_keystone_exports() -> None:
    exported = _exported_names()
    for rule in _rules():
        used = set(re.findall(r"\b(keystone_[a-z_]+)\b", rule["expr"]))
        assert used, rule["alert"]
        assert used <= exported, (rule["alert"], used - exported)
