"""QA library: the fault corpus gets the right verdicts in both tiers, hostile input is
bounded, every check and the score behave as documented, and ``keystone qa`` exits 0/1/2."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from mcap.reader import make_reader
from typer.testing import CliRunner

from keystone_cli.main import app
from keystone_core.qa.checks import (
    AUTO_APPROVED,
    NEEDS_INSPECTION,
    QA_FAILED,
    Check,
    Expectations,
    QAConfig,
    check_consistency,
    check_message_gaps,
    score,
    weigh,
)
from keystone_core.qa.inventory import MAGIC, Inventory, Limits
from keystone_core.qa.run import AUTO, FAST, THOROUGH, Report, assess
from keystone_core.qa.source import LocalSource
from keystone_core.simulation.episodes import DEFAULT_TOPICS, EpisodeSpec, generate

DEVICE = "AB-F0001-T0001-000001"
REQUIRED = tuple(t.name for t in DEFAULT_TOPICS)

# fault → (verdict, the check that must fail)
CORPUS: dict[str, tuple[str, str | None]] = {
    "clean": (AUTO_APPROVED, None),
    "truncate": (NEEDS_INSPECTION, "structure"),  # multi-chunk: the first chunks recover
    "truncate_small": (QA_FAILED, "structure"),  # one chunk cut: nothing to recover
    "truncate_summary": (NEEDS_INSPECTION, "structure"),
    "drop_topic": (NEEDS_INSPECTION, "required_topics"),
    "time_gap": (NEEDS_INSPECTION, "message_gaps"),
    "corrupt_jpeg": (NEEDS_INSPECTION, "image_decode"),
    "truncated_jpeg": (NEEDS_INSPECTION, "image_decode"),
    "zero_frames": (NEEDS_INSPECTION, "frame_sizes"),
    "too_short": (NEEDS_INSPECTION, "duration"),
    "sidecar_mismatch": (NEEDS_INSPECTION, "consistency"),
    "wrong_checksum": (QA_FAILED, "checksum"),
    "garbage": (QA_FAILED, "structure"),
    "empty": (QA_FAILED, "structure"),
}


def _spec(name: str) -> EpisodeSpec:
    fault = {"truncate_small": "truncate"}.get(name, name)
    return EpisodeSpec(
        task_id=f"task_{name}",
        device_id=DEVICE,
        duration_s=10.0,
        # Several 4 MiB chunks, so a cut mid-data leaves whole chunks before it.
        target_bytes=14 * 2**20 if name == "truncate" else None,
        faults=frozenset() if name == "clean" else frozenset({fault}),
        seed=7,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Expectations]]:
    root = tmp_path_factory.mktemp("qa-corpus")
    out = {}
    for name in CORPUS:
        spec = _spec(name)
        episode = generate(spec, root / name)
        out[name] = (
            episode.mcap_path,
            Expectations(
                task_id=spec.task_id,
                device_id=DEVICE,
                required_topics=REQUIRED,
                checksum_sha256=episode.sha256,
            ),
        )
    return out


def _assess(path: Path, expect: Expectations, tier: str, **kwargs: object) -> Report:
    source = LocalSource(path)
    try:
        return assess(source, expect, tier=tier, **kwargs)  # type: ignore[arg-type]
    finally:
        source.close()


@pytest.mark.parametrize("tier", [FAST, THOROUGH])
@pytest.mark.parametrize("name", list(CORPUS))
def test_fault_corpus_gets_the_right_verdict_and_failing_check(
    corpus: dict[str, tuple[Path, Expectations]], name: str, tier: str
) -> None:
    path, expect = corpus[name]
    report = _assess(path, expect, tier)
    verdict, failing = CORPUS[name]
    assert report.verdict == verdict, [c.reason for c in report.failing()]
    if failing is None:
        assert report.failing() == []
        assert report.score >= 0.95
    else:
        names = [c.name for c in report.failing()]
        assert failing in names
        assert report.score < QAConfig().threshold
        assert all(c.reason for c in report.failing())


def test_fast_tier_reads_indexes_not_chunks(corpus: dict[str, tuple[Path, Expectations]]) -> None:
    path, expect = corpus["truncate"]  # the largest file; use an intact one of that size
    episode = generate(replace(_spec("truncate"), faults=frozenset()), path.parent / "intact")
    report = _assess(episode.mcap_path, replace(expect, checksum_sha256=episode.sha256), FAST)
    assert report.verdict == AUTO_APPROVED
    full = _assess(episode.mcap_path, replace(expect, checksum_sha256=episode.sha256), THOROUGH)
    assert full.stats["bytes_read"] >= episode.size
    # Summary, indexes and a sample of chunks: well under the whole file.
    assert report.stats["bytes_read"] < full.stats["bytes_read"]
    assert full.checks[-1].name == "chunk_crc"
    assert full.checks[-1].passed is True
    sha = next(c for c in full.checks if c.name == "checksum")
    assert sha.passed is True
    assert "object" in sha.value


def test_auto_tier_escalates_damaged_files_to_the_thorough_tier(
    corpus: dict[str, tuple[Path, Expectations]],
) -> None:
    path, expect = corpus["truncate_summary"]
    report = _assess(path, expect, AUTO)
    assert report.tier == THOROUGH
    assert report.escalated_from is not None
    clean_path, clean_expect = corpus["clean"]
    assert _assess(clean_path, clean_expect, AUTO).tier == FAST


def test_missing_sidecar_and_bad_sidecar_are_consistency_findings(
    corpus: dict[str, tuple[Path, Expectations]], tmp_path: Path
) -> None:
    path, expect = corpus["clean"]
    copy = tmp_path / "task_clean.mcap"
    copy.write_bytes(path.read_bytes())
    report = _assess(copy, expect, FAST)
    consistency = next(c for c in report.checks if c.name == "consistency")
    assert consistency.passed is False
    assert "no sidecar" in consistency.reason
    (tmp_path / "task_clean.json").write_text("{not json")
    report = _assess(copy, expect, FAST)
    assert "not valid JSON" in next(c for c in report.checks if c.name == "consistency").reason


# --- hostile input ------------------------------------------------------------------------


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "hostile.mcap"
    path.write_bytes(data)
    return path


def test_a_record_claiming_exabytes_is_unreadable_not_a_memory_spike(tmp_path: Path) -> None:
    data = MAGIC + bytes([0x01]) + struct.pack("<Q", 2**60) + b"x" * 100
    report = _assess(_write(tmp_path, data), Expectations(), THOROUGH)
    assert report.verdict == QA_FAILED
    assert report.unreadable
    report = _assess(_write(tmp_path, data), Expectations(), FAST)
    assert report.verdict == QA_FAILED
    assert "nothing recoverable" in report.checks[0].reason


def test_a_summary_over_the_limit_is_unreadable(
    corpus: dict[str, tuple[Path, Expectations]],
) -> None:
    path, expect = corpus["clean"]
    report = _assess(path, expect, FAST, limits=Limits(max_summary_bytes=16))
    assert report.verdict == QA_FAILED
    assert "over the 16 limit" in report.checks[0].reason


def test_oversized_metadata_is_skipped_and_said(
    corpus: dict[str, tuple[Path, Expectations]],
) -> None:
    path, expect = corpus["clean"]
    report = _assess(path, expect, FAST, limits=Limits(max_metadata_bytes=8))
    structure = report.checks[0]
    assert structure.passed is True
    assert "metadata record(s) over the limits" in structure.reason


def test_a_chunk_claiming_a_huge_size_fails_its_frames_without_allocating(
    corpus: dict[str, tuple[Path, Expectations]], tmp_path: Path
) -> None:
    path, expect = corpus["clean"]
    with path.open("rb") as stream:
        summary = make_reader(stream).get_summary()
    assert summary is not None
    chunk = summary.chunk_indexes[0].chunk_start_offset
    data = bytearray(path.read_bytes())
    assert data[chunk] == 0x06
    struct.pack_into("<Q", data, chunk + 9 + 16, 2**50)  # uncompressed_size
    hostile = _write(tmp_path, bytes(data))
    fast = _assess(hostile, replace(expect, checksum_sha256=None), FAST)
    assert fast.verdict != AUTO_APPROVED
    thorough = _assess(hostile, replace(expect, checksum_sha256=None), THOROUGH)
    assert "chunk_crc" in [c.name for c in thorough.failing()]


def test_the_time_budget_ends_a_read_as_unreadable(
    corpus: dict[str, tuple[Path, Expectations]],
) -> None:
    path, expect = corpus["clean"]
    report = _assess(path, expect, THOROUGH, limits=Limits(seconds=0.0))
    assert report.verdict == QA_FAILED
    assert "time budget" in report.checks[0].reason


def test_unknown_tier_is_refused(corpus: dict[str, tuple[Path, Expectations]]) -> None:
    path, expect = corpus["clean"]
    with pytest.raises(ValueError, match="unknown tier"):
        _assess(path, expect, "slow")


# --- checks and score ---------------------------------------------------------------------


def _inventory(times: dict[int, list[int]]) -> Inventory:
    from array import array

    from keystone_core.qa.inventory import ChannelInfo

    inventory = Inventory(size=1000, tier="fast")
    for cid, values in times.items():
        inventory.channels[cid] = ChannelInfo(cid, f"/topic{cid}", 0, "cdr")
        inventory.times[cid] = array("q", values)
        inventory.sizes[cid] = array("q", [100] * len(values))
    inventory.finish()
    return inventory


def test_gaps_are_judged_against_each_topics_own_rate() -> None:
    second = 10**9
    steady = list(range(0, 10 * second, second // 100))  # 100 Hz for 10 s
    slow = list(range(0, 10 * second, second // 2))  # 2 Hz: 0.5 s apart is normal
    assert check_message_gaps(_inventory({1: steady, 2: slow}), QAConfig()).passed is True
    holed = [t for t in steady if not 4 * second <= t < 6 * second]
    check = check_message_gaps(_inventory({1: holed, 2: slow}), QAConfig())
    assert check.passed is False
    assert "/topic1 silent for 2.0" in check.reason
    # A topic that stops early is silent until the end of the recording.
    stops = [t for t in steady if t < 5 * second]
    assert check_message_gaps(_inventory({1: stops, 2: slow}), QAConfig()).passed is False


def test_consistency_tolerates_what_real_recordings_differ_in() -> None:
    second = 10**9
    inventory = _inventory({1: list(range(0, 8 * second, second // 100))})
    inventory.metadata = {
        "axon.task": {"task_id": "task_1 caf"},  # the recorder drops non-ASCII
        "axon.device": {"device_id": "dev-1"},
        "axon.recording": {"message_count": str(800 - 3)},  # in flight at finish
    }
    sidecar = {
        "task": {"task_id": "task_1 café"},
        "device": {"device_id": "dev-1"},
        # 2 s paused: the sidecar's duration includes it, the MCAP span does not.
        "recording": {"message_count": 800 + 5, "duration_sec": 10.0, "checksum_sha256": "a"},
    }
    expect = Expectations(task_id="task_1 café", device_id="dev-1", sidecar=sidecar)
    check = check_consistency(inventory, expect, QAConfig())
    assert check.passed is True, check.reason
    bad = replace(expect, sidecar={**sidecar, "recording": {"message_count": 5000}})
    assert check_consistency(inventory, bad, QAConfig()).passed is False
    other = replace(expect, device_id="dev-2")
    assert "device id differs" in check_consistency(inventory, other, QAConfig()).reason


def test_score_is_a_weighted_mean_capped_by_failures_and_fatal_checks_fail_the_episode() -> None:
    config = QAConfig()

    def c(name: str, passed: bool | None) -> Check:
        return Check(name, passed, None, None, "why")

    clean = weigh([c("structure", True), c("duration", True), c("chunk_crc", None)], config)
    assert score(clean, config).score == 1.0
    assert score(clean, config).verdict == AUTO_APPROVED
    missing = weigh(
        [c("structure", True), c("duration", True), c("required_topics", False)], config
    )
    outcome = score(missing, config)
    # Weighted mean (0.15 + 0.10) / 0.45 = 0.556, then the missing topic's cap of 0.5.
    assert outcome.score == 0.5
    assert outcome.verdict == NEEDS_INSPECTION
    assert outcome.hard_failure
    fatal = weigh([c("structure", True), c("checksum", False)], config)
    assert score(fatal, config).verdict == QA_FAILED
    # A robot type may soften a check: a failure capped above the threshold can still pass.
    soft = config.with_overrides({"weights": {"frame_sizes": [0.01, 1.0]}})
    mostly = weigh([c("structure", True), c("duration", True), c("frame_sizes", False)], soft)
    assert score(mostly, soft).verdict == AUTO_APPROVED


def test_robot_type_overrides_apply_and_unknown_keys_are_ignored() -> None:
    config = QAConfig().with_overrides(
        {"max_gap_s": 3.0, "threshold": 0.8, "bogus": 1, "weights": {"duration": 0.5, "x": 1}}
    )
    assert config.max_gap_s == 3.0
    assert config.threshold == 0.8
    assert config.weights["duration"] == (0.5, 0.7)
    assert "x" not in config.weights


# --- CLI ----------------------------------------------------------------------------------


def test_cli_exit_codes_and_json(corpus: dict[str, tuple[Path, Expectations]]) -> None:
    runner = CliRunner()
    clean, _ = corpus["clean"]
    ok = runner.invoke(app, ["qa", str(clean), "--require", REQUIRED[0], "--json"])
    assert ok.exit_code == 0, ok.output
    body = json.loads(ok.stdout)
    assert body["verdict"] == AUTO_APPROVED
    assert {c["name"] for c in body["checks"]} >= {
        "structure",
        "message_gaps",
    }
    gap, _ = corpus["time_gap"]
    table = runner.invoke(app, ["qa", str(gap)])
    assert table.exit_code == 1
    assert "message_gaps" in table.stdout
    garbage, _ = corpus["garbage"]
    assert runner.invoke(app, ["qa", str(garbage)]).exit_code == 2
    assert runner.invoke(app, ["qa", str(clean.parent / "missing.mcap")]).exit_code == 2
    assert runner.invoke(app, ["qa", str(clean), "--tier", "slow"]).exit_code == 2
    assert runner.invoke(app, ["qa", "s3://bucket-only"]).exit_code == 2
