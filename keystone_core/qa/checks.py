"""The QA checks, their configuration and the score.

Each check looks at an ``Inventory`` (what the file holds) and ``Expectations`` (what the
task, robot type, upload and sidecar say it should hold) and returns a ``Check``: a
value, the threshold it was held to, passed or not, and a sentence a person understands.

Score: the weighted mean of the checks that apply (``passed`` = 1, failed = 0), then capped
by every failed check's cap. The caps are what make a defect decisive: a missing required
topic caps the score at 0.5 however clean the rest is. Two checks are *fatal* — the file
cannot be read, or its bytes are not the bytes the device hashed — and make the verdict
``qa_failed``. Otherwise the episode is ``auto_approved`` when the score reaches the
threshold with no failed check, else ``needs_inspection``. Weights, caps and thresholds
come from settings and may be overridden per robot type (``robot_types.qa_config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from keystone_core.qa.inventory import Inventory

AUTO_APPROVED = "auto_approved"
NEEDS_INSPECTION = "needs_inspection"
QA_FAILED = "qa_failed"

# name: (weight, cap when failed). Fatal checks also decide the verdict (qa_failed).
DEFAULT_WEIGHTS: dict[str, tuple[float, float]] = {
    "structure": (0.15, 0.6),
    "required_topics": (0.20, 0.5),
    "duration": (0.10, 0.7),
    "message_gaps": (0.15, 0.8),
    "frame_sizes": (0.10, 0.8),
    "image_decode": (0.15, 0.7),
    "consistency": (0.10, 0.8),
    "checksum": (0.05, 0.3),
    "chunk_crc": (0.10, 0.5),
}
FATAL = frozenset({"checksum"})


@dataclass(frozen=True)
class QAConfig:
    threshold: float = 0.90
    # Scores within this distance of the threshold get the thorough tier automatically.
    thorough_band: float = 0.05
    min_duration_s: float = 1.0
    max_duration_s: float | None = None
    # A topic is silent when it has no message for max(max_gap_s, gap_factor x its period).
    max_gap_s: float = 1.0
    gap_factor: float = 10.0
    # A frame is empty/cut when smaller than this many bytes or this fraction of its
    # topic's median size.
    min_frame_bytes: int = 64
    min_frame_fraction: float = 0.05
    # Messages in flight at finish: counts may differ by this many per topic.
    count_slack_per_topic: int = 64
    # Sidecar duration (includes pauses) vs the MCAP's span.
    duration_slack_s: float = 2.0
    weights: Mapping[str, tuple[float, float]] = field(default_factory=lambda: DEFAULT_WEIGHTS)

    def with_overrides(self, overrides: Mapping[str, Any]) -> QAConfig:
        """A copy with a robot type's ``qa_config`` applied (unknown keys are ignored;
        ``weights`` maps a check to ``[weight, cap]`` or to a weight alone)."""
        names = {f.name for f in fields(self)} - {"weights"}
        values: dict[str, Any] = {
            k: v for k, v in overrides.items() if k in names and v is not None
        }
        weights = dict(self.weights)
        for name, value in dict(overrides.get("weights") or {}).items():
            if name not in weights:
                continue
            if isinstance(value, int | float):
                weights[name] = (float(value), weights[name][1])
            elif isinstance(value, list | tuple) and len(value) == 2:
                weights[name] = (float(value[0]), float(value[1]))
        return replace(self, **values, weights=weights)


@dataclass(frozen=True)
class Expectations:
    """What the episode should be; None/empty means "not known, not checked"."""

    task_id: str | None = None
    device_id: str | None = None
    required_topics: tuple[str, ...] = ()
    min_duration_s: float | None = None
    max_duration_s: float | None = None
    checksum_sha256: str | None = None  # the upload's (transfer message / object metadata)
    sidecar: Mapping[str, Any] | None = None
    # Why the sidecar could not be used (not JSON, too large); reported by consistency.
    sidecar_problem: str | None = None


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool | None  # None: does not apply (not scored)
    value: Any
    threshold: Any
    reason: str
    weight: float = 0.0
    cap: float = 1.0
    fatal: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ascii(value: Any) -> str:
    """Text as the recorder writes MCAP metadata: non-ASCII dropped, trimmed."""
    return "".join(ch for ch in str(value) if ord(ch) < 128).strip()


def _topics(inventory: Inventory) -> dict[str, int]:
    counts = inventory.counts()
    out: dict[str, int] = {}
    for cid, info in inventory.channels.items():
        out[info.topic] = out.get(info.topic, 0) + counts.get(cid, 0)
    return out


def _seconds(ns: int) -> float:
    return ns / 1e9


def check_structure(inventory: Inventory) -> Check:
    if inventory.recovered:
        return Check(
            "structure",
            False,
            "recovered",
            "intact",
            "file is damaged; read by scanning its records: " + "; ".join(inventory.notes[:3]),
        )
    notes = [n for n in inventory.notes if "not chunked" not in n]
    reason = "magic, header, footer and summary present"
    if notes:
        reason += " (" + "; ".join(notes[:2]) + ")"
    return Check("structure", True, "intact", "intact", reason)


def check_required_topics(inventory: Inventory, expect: Expectations) -> Check:
    if not expect.required_topics:
        return Check("required_topics", None, [], [], "no required topics configured")
    counts = _topics(inventory)
    missing = [t for t in expect.required_topics if counts.get(t, 0) == 0]
    if missing:
        present = [t for t in missing if t in counts]
        detail = "; ".join(
            f"{t} {'has 0 messages' if t in present else 'is absent'}" for t in missing
        )
        return Check("required_topics", False, missing, list(expect.required_topics), detail)
    return Check(
        "required_topics",
        True,
        {t: counts[t] for t in expect.required_topics},
        list(expect.required_topics),
        f"all {len(expect.required_topics)} required topics have messages",
    )


def check_duration(inventory: Inventory, expect: Expectations, config: QAConfig) -> Check:
    low = expect.min_duration_s if expect.min_duration_s is not None else config.min_duration_s
    high = expect.max_duration_s if expect.max_duration_s is not None else config.max_duration_s
    threshold = {"min_s": low, "max_s": high}
    if inventory.start_ns is None or inventory.end_ns is None:
        return Check("duration", False, 0.0, threshold, "no messages: the recording has no length")
    span = round(_seconds(inventory.end_ns - inventory.start_ns), 3)
    if low is not None and span < low:
        return Check("duration", False, span, threshold, f"{span:.2f} s is shorter than {low} s")
    if high is not None and span > high:
        return Check("duration", False, span, threshold, f"{span:.2f} s is longer than {high} s")
    return Check("duration", True, span, threshold, f"{span:.2f} s is within the task's limits")


def _gap_limit(diffs: np.ndarray, config: QAConfig) -> float:
    """Seconds a topic may be silent: max(max_gap_s, gap_factor x its median period)."""
    period = float(np.median(diffs))
    return max(config.max_gap_s, config.gap_factor * _seconds(int(period)))


@dataclass(frozen=True)
class Silence:
    """A span in which one topic had no message for longer than it may (log times, ns)."""

    channel_id: int
    topic: str
    start_ns: int
    end_ns: int
    allowed_s: float

    @property
    def seconds(self) -> float:
        return _seconds(self.end_ns - self.start_ns)


def silences(inventory: Inventory, config: QAConfig) -> list[Silence]:
    """Every span ``check_message_gaps`` holds against a topic (it reports the longest per
    topic): silences between messages, and before the first / after the last message
    relative to the whole recording. Topics with fewer than 2 messages have no rate."""
    if inventory.start_ns is None or inventory.end_ns is None:
        return []
    out: list[Silence] = []
    for cid, raw in sorted(inventory.times.items()):
        times = np.frombuffer(raw, dtype=np.int64)
        if len(times) < 2:
            continue
        info = inventory.channels.get(cid)
        topic = info.topic if info else f"channel {cid}"
        diffs = np.diff(times)
        limit = _gap_limit(diffs, config)
        spans = [(inventory.start_ns, int(times[0]))]
        spans += [(int(times[i]), int(times[i + 1])) for i in np.flatnonzero(diffs / 1e9 > limit)]
        spans.append((int(times[-1]), inventory.end_ns))
        out.extend(
            Silence(cid, topic, start, end, round(limit, 3))
            for start, end in spans
            if _seconds(end - start) > limit
        )
    return out


def check_message_gaps(inventory: Inventory, config: QAConfig) -> Check:
    """The longest silence of each topic, including before its first and after its last
    message (relative to the whole recording), against the topic's own rate."""
    if inventory.start_ns is None or inventory.end_ns is None:
        return Check("message_gaps", None, {}, {}, "no messages")
    worst: dict[str, float] = {}
    allowed: dict[str, float] = {}
    failing: list[str] = []
    for cid, raw in inventory.times.items():
        info = inventory.channels.get(cid)
        topic = info.topic if info else f"channel {cid}"
        times = np.frombuffer(raw, dtype=np.int64)
        if len(times) < 2:
            continue
        diffs = np.diff(times)
        limit = _gap_limit(diffs, config)
        widest = int(np.argmax(diffs))
        inner = int(diffs[widest])
        edges = [int(times[0]) - inventory.start_ns, inventory.end_ns - int(times[-1])]
        biggest = max(inner, *edges)
        worst[topic] = round(_seconds(biggest), 3)
        allowed[topic] = round(limit, 3)
        if _seconds(biggest) > limit:
            where = widest if inner >= max(edges) else None
            at = (
                f" after {(_seconds(int(times[where]) - inventory.start_ns)):.1f} s"
                if where is not None
                else " at the start or end"
            )
            failing.append(
                f"{topic} silent for {_seconds(biggest):.2f} s{at} (allowed {limit:.2f} s)"
            )
    exact = "exact, every message" if inventory.exact else "from the message indexes"
    if failing:
        return Check("message_gaps", False, worst, allowed, "; ".join(failing[:5]) + f" ({exact})")
    return Check("message_gaps", True, worst, allowed, f"no topic falls silent ({exact})")


def check_frame_sizes(inventory: Inventory, config: QAConfig) -> Check:
    """Empty or cut frames from per-message sizes (index offsets, or the full read)."""
    flagged: dict[str, int] = {}
    examined = 0
    for cid, raw in inventory.sizes.items():
        sizes = np.frombuffer(raw, dtype=np.int64)
        known = sizes[sizes >= 0]
        if not len(known):
            continue
        examined += len(known)
        median = float(np.median(known))
        floor = max(config.min_frame_bytes, config.min_frame_fraction * median)
        if median < config.min_frame_bytes:  # a topic of small messages (e.g. IMU)
            floor = min(floor, median / 2)
        small = int(np.count_nonzero(known < floor))
        if small:
            info = inventory.channels.get(cid)
            flagged[info.topic if info else f"channel {cid}"] = small
    threshold = {
        "min_bytes": config.min_frame_bytes,
        "min_fraction_of_median": config.min_frame_fraction,
    }
    if not examined:
        return Check("frame_sizes", None, {}, threshold, "no message sizes known")
    if flagged:
        detail = ", ".join(f"{t}: {n}" for t, n in flagged.items())
        return Check("frame_sizes", False, flagged, threshold, f"empty or cut messages — {detail}")
    return Check("frame_sizes", True, 0, threshold, f"none of {examined} messages is empty or cut")


def check_image_decode(inventory: Inventory) -> Check:
    if not inventory.frames:
        has_images = any(
            kind for kind in (inventory.schema_of(c) for c in inventory.channels) if "Image" in kind
        )
        reason = "no image frames could be sampled" if has_images else "no image topics"
        return Check("image_decode", False if has_images else None, 0, 0, reason)
    bad = [f for f in inventory.frames if f.problem]
    scope = "frames (all)" if inventory.exact else "sampled frames"
    if bad:
        first = bad[0]
        topic = (
            inventory.channels[first.channel_id].topic
            if first.channel_id in inventory.channels
            else "?"
        )
        return Check(
            "image_decode",
            False,
            {"decoded": len(inventory.frames), "failed": len(bad)},
            {"failed": 0},
            f"{len(bad)} of {len(inventory.frames)} {scope} fail to decode; "
            f"first on {topic}: {first.problem}",
        )
    return Check(
        "image_decode",
        True,
        {"decoded": len(inventory.frames), "failed": 0},
        {"failed": 0},
        f"{len(inventory.frames)} {scope} decode completely",
    )


def _sidecar_section(expect: Expectations, name: str) -> Mapping[str, Any]:
    section = (expect.sidecar or {}).get(name)
    return section if isinstance(section, Mapping) else {}


def check_consistency(inventory: Inventory, expect: Expectations, config: QAConfig) -> Check:
    """Sidecar ⇄ MCAP metadata ⇄ task: ids, counts, size, duration (tolerances in QAConfig)."""
    problems: list[str] = []
    compared: list[str] = []
    task_md = inventory.metadata.get("axon.task", {})
    device_md = inventory.metadata.get("axon.device", {})
    recording_md = inventory.metadata.get("axon.recording", {})
    side_task = _sidecar_section(expect, "task")
    side_device = _sidecar_section(expect, "device")
    side_rec = _sidecar_section(expect, "recording")

    for label, values in (
        (
            "task id",
            {
                "task": expect.task_id,
                "sidecar": side_task.get("task_id"),
                "MCAP": task_md.get("task_id"),
            },
        ),
        (
            "device id",
            {
                "task": expect.device_id,
                "sidecar": side_device.get("device_id"),
                "MCAP": device_md.get("device_id"),
            },
        ),
    ):
        known = {k: _ascii(v) for k, v in values.items() if v not in (None, "")}
        if len(known) >= 2:
            compared.append(label)
            if len(set(known.values())) > 1:
                problems.append(
                    f"{label} differs: " + ", ".join(f"{k} {v!r}" for k, v in known.items())
                )

    total = inventory.total()
    slack = config.count_slack_per_topic * max(1, len(inventory.channels))
    for label, stated in (
        ("sidecar", side_rec.get("message_count")),
        ("MCAP metadata", recording_md.get("message_count")),
    ):
        try:
            number = int(stated) if stated not in (None, "") else None
        except (TypeError, ValueError):
            problems.append(f"{label} message count {stated!r} is not a number")
            continue
        if number is None:
            continue
        compared.append(f"{label} message count")
        if abs(number - total) > slack and not inventory.recovered:
            problems.append(f"{label} says {number} messages, the file holds {total} (±{slack})")

    size = side_rec.get("file_size_bytes")
    if isinstance(size, int) and size:
        compared.append("file size")
        if size != inventory.size:
            problems.append(f"sidecar says {size} bytes, the object has {inventory.size}")

    duration = side_rec.get("duration_sec")
    if (
        isinstance(duration, int | float)
        and inventory.start_ns is not None
        and inventory.end_ns is not None
        and not inventory.recovered
    ):
        compared.append("duration")
        span = _seconds(inventory.end_ns - inventory.start_ns)
        # The sidecar counts paused time and the wall clock to the last write: the MCAP
        # span may be shorter by the pauses, never much longer.
        if span > float(duration) + config.duration_slack_s:
            problems.append(f"MCAP spans {span:.2f} s, longer than the sidecar's {duration} s")
        elif span < float(duration) * 0.5 - config.duration_slack_s:
            problems.append(f"MCAP spans {span:.2f} s, under half the sidecar's {duration} s")

    if expect.sidecar_problem:
        problems.append(expect.sidecar_problem)
    side_sum = _sidecar_section(expect, "recording").get("checksum_sha256")
    if expect.sidecar is not None and side_sum in (None, ""):
        problems.append("sidecar has no recording.checksum_sha256")

    threshold = {"count_slack": slack, "duration_slack_s": config.duration_slack_s}
    if not compared and not problems and expect.sidecar is None:
        return Check("consistency", None, [], threshold, "no sidecar or task to compare with")
    if problems:
        return Check("consistency", False, problems, threshold, "; ".join(problems[:4]))
    return Check("consistency", True, compared, threshold, "agree: " + ", ".join(compared))


def check_checksum(inventory: Inventory, expect: Expectations) -> Check:
    """The SHA-256 fields agree (fast) — and, after a full read, match the bytes."""
    sources = {
        "upload": expect.checksum_sha256,
        "sidecar": _sidecar_section(expect, "recording").get("checksum_sha256"),
        "object": inventory.sha256,
    }
    known = {k: str(v).lower() for k, v in sources.items() if v}
    if len(known) < 2:
        return Check("checksum", None, known, "equal", "fewer than two SHA-256 values to compare")
    if len(set(known.values())) > 1:
        detail = ", ".join(f"{k} {v[:12]}…" for k, v in known.items())
        return Check("checksum", False, known, "equal", f"SHA-256 values disagree: {detail}")
    what = "the object's bytes and " if inventory.sha256 else ""
    return Check(
        "checksum",
        True,
        known,
        "equal",
        f"{what}{', '.join(k for k in known if k != 'object')} agree",
    )


def check_chunk_crc(inventory: Inventory) -> Check:
    if not inventory.exact:
        return Check("chunk_crc", None, None, 0, "not read in the fast tier")
    if inventory.crc_errors:
        return Check(
            "chunk_crc",
            False,
            len(inventory.crc_errors),
            0,
            f"{len(inventory.crc_errors)} chunk(s) damaged: " + "; ".join(inventory.crc_errors[:3]),
        )
    return Check(
        "chunk_crc",
        True,
        0,
        0,
        f"all {len(inventory.chunks)} chunks decompress and match their CRC",
    )


def unreadable_check(reason: str) -> Check:
    return Check("structure", False, "unreadable", "intact", reason, fatal=True)


def all_checks(inventory: Inventory, expect: Expectations, config: QAConfig) -> list[Check]:
    return [
        check_structure(inventory),
        check_required_topics(inventory, expect),
        check_duration(inventory, expect, config),
        check_message_gaps(inventory, config),
        check_frame_sizes(inventory, config),
        check_image_decode(inventory),
        check_consistency(inventory, expect, config),
        check_checksum(inventory, expect),
        check_chunk_crc(inventory),
    ]


def weigh(checks: list[Check], config: QAConfig) -> list[Check]:
    """Attach each check's weight, cap and fatality from the configuration."""
    out = []
    for check in checks:
        weight, cap = config.weights.get(check.name, (0.0, 1.0))
        fatal = check.fatal or check.name in FATAL
        out.append(replace(check, weight=weight, cap=0.0 if check.fatal else cap, fatal=fatal))
    return out


@dataclass(frozen=True)
class Outcome:
    score: float
    verdict: str
    hard_failure: bool


def score(checks: list[Check], config: QAConfig) -> Outcome:
    applicable = [c for c in checks if c.passed is not None]
    total = sum(c.weight for c in applicable)
    value = sum(c.weight for c in applicable if c.passed) / total if total else 0.0
    failed = [c for c in applicable if not c.passed]
    for check in failed:
        value = min(value, check.cap)
    value = round(max(0.0, min(1.0, value)), 4)
    if any(c.fatal for c in failed):
        return Outcome(value, QA_FAILED, True)
    hard = any(c.cap < config.threshold for c in failed)
    if value >= config.threshold and not hard:
        return Outcome(value, AUTO_APPROVED, False)
    return Outcome(value, NEEDS_INSPECTION, hard)
