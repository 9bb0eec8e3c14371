"""Scoring one episode: pick the tier, read, check, score — the one entry point.

``assess(source, expectations, config, tier)`` never raises for a bad file (garbage,
empty, truncated to nothing, hostile lengths, over the time budget): those are reports
with verdict ``qa_failed`` and the reason. It raises ``SourceError`` only when the object
itself cannot be read (missing, store down) — a transient condition the caller retries.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

from keystone_core.qa.checks import (
    Check,
    Expectations,
    QAConfig,
    all_checks,
    score,
    unreadable_check,
    weigh,
)
from keystone_core.qa.inventory import (
    Inventory,
    Limits,
    Unreadable,
    indexed_inventory,
    scanned_inventory,
)
from keystone_core.qa.source import Source

FAST = "fast"
THOROUGH = "thorough"
AUTO = "auto"  # fast, then thorough when the fast score is borderline or the file damaged
MAX_SIDECAR_BYTES = 1024 * 1024


@dataclass
class Report:
    source: str
    tier: str
    score: float
    verdict: str
    hard_failure: bool
    checks: list[Check]
    stats: dict[str, Any] = field(default_factory=dict)
    # When the thorough tier ran because the fast one was borderline: the fast report.
    escalated_from: Report | None = None
    # What was read, when asked for (``keep_inventory``): the previews draw from it.
    inventory: Inventory | None = field(default=None, repr=False, compare=False)

    @property
    def unreadable(self) -> bool:
        return any(c.name == "structure" and c.value == "unreadable" for c in self.checks)

    def failing(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source,
            "tier": self.tier,
            "score": self.score,
            "verdict": self.verdict,
            "hard_failure": self.hard_failure,
            "checks": [c.as_dict() for c in self.checks],
            "stats": self.stats,
        }
        if self.escalated_from is not None:
            out["escalated_from"] = {
                "tier": self.escalated_from.tier,
                "score": self.escalated_from.score,
                "verdict": self.escalated_from.verdict,
            }
        return out


def load_sidecar(source: Source, expect: Expectations) -> Expectations:
    """Expectations with the sidecar next to the MCAP, when not given already."""
    if expect.sidecar is not None or expect.sidecar_problem:
        return expect
    try:
        raw = source.sibling(".json", MAX_SIDECAR_BYTES)
    except Exception as exc:  # a sidecar we cannot fetch is a finding, not a crash
        return replace(expect, sidecar_problem=f"sidecar not readable: {exc}"[:300])
    if raw is None:
        return replace(expect, sidecar_problem="no sidecar (.json) next to the MCAP")
    try:
        data = json.loads(raw)
    except ValueError:
        return replace(expect, sidecar_problem="sidecar is not valid JSON")
    if not isinstance(data, dict):
        return replace(expect, sidecar_problem="sidecar is not a JSON object")
    return replace(expect, sidecar=data)


def assess(
    source: Source,
    expect: Expectations | None = None,
    config: QAConfig | None = None,
    tier: str = FAST,
    limits: Limits | None = None,
    *,
    with_sidecar: bool = True,
    keep_inventory: bool = False,
) -> Report:
    """Score one episode (see the module docstring). ``keep_inventory``: the report keeps
    what the deciding tier read (``Report.inventory``; None when the file was unreadable)."""
    if tier not in (FAST, THOROUGH, AUTO):
        raise ValueError(f"unknown tier {tier!r}")
    config = config or QAConfig()
    limits = limits or Limits()
    expect = expect or Expectations()
    if with_sidecar:
        expect = load_sidecar(source, expect)
    fast = _run(
        source, expect, config, limits, THOROUGH if tier == THOROUGH else FAST, keep_inventory
    )
    if tier != AUTO or fast.unreadable or not _borderline(fast, config):
        return fast
    fast.inventory = None
    thorough = _run(source, expect, config, limits, THOROUGH, keep_inventory)
    thorough.escalated_from = fast
    return thorough


def _borderline(report: Report, config: QAConfig) -> bool:
    """Close to the threshold, or a damaged file: worth a full read."""
    if any(c.name == "structure" and c.passed is False for c in report.checks):
        return True
    return abs(report.score - config.threshold) <= config.thorough_band


def _run(
    source: Source,
    expect: Expectations,
    config: QAConfig,
    limits: Limits,
    tier: str,
    keep_inventory: bool = False,
) -> Report:
    started = time.monotonic()
    read_before, requests_before = source.bytes_read, source.requests
    inventory: Inventory | None = None
    try:
        if tier == THOROUGH:
            inventory = scanned_inventory(source, limits, full=True)
        else:
            inventory = indexed_inventory(source, limits)
        checks = weigh(all_checks(inventory, expect, config), config)
    except Unreadable as exc:
        checks = weigh([unreadable_check(str(exc))], config)
    outcome = score(checks, config)
    seconds = time.monotonic() - started
    stats: dict[str, Any] = {
        "size_bytes": source.size,
        "bytes_read": source.bytes_read - read_before,
        "read_fraction": round((source.bytes_read - read_before) / source.size, 5)
        if source.size
        else 0.0,
        "requests": source.requests - requests_before,
        "seconds": round(seconds, 4),
    }
    if inventory is not None:
        stats.update(
            messages=inventory.total(),
            chunks=len(inventory.chunks),
            topics={c.topic: n for c, n in _topic_counts(inventory)},
            duration_s=round((inventory.end_ns - inventory.start_ns) / 1e9, 3)
            if inventory.start_ns is not None and inventory.end_ns is not None
            else None,
            frames_decoded=len(inventory.frames),
        )
    return Report(
        source.name,
        tier,
        outcome.score,
        outcome.verdict,
        outcome.hard_failure,
        checks,
        stats,
        inventory=inventory if keep_inventory else None,
    )


def _topic_counts(inventory: Inventory) -> list[tuple[Any, int]]:
    counts = inventory.counts()
    return [(info, counts.get(cid, 0)) for cid, info in sorted(inventory.channels.items())]
