"""Generated episodes look like the recorder's, and each injected fault is really there."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory
from PIL import Image

from keystone_core.simulation.episodes import EpisodeSpec, generate

CAMERA = "/camera0/rgb/compressed"


def spec(**overrides: object) -> EpisodeSpec:
    values: dict[str, object] = {
        "task_id": "task-g",
        "device_id": "AB-F0001-T0001-000001",
        "duration_s": 6.0,
    }
    values.update(overrides)
    return EpisodeSpec(**values)  # type: ignore[arg-type]


def frames(path: Path) -> list[bytes]:
    with path.open("rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        return [bytes(m.data) for _s, _c, _r, m in reader.iter_decoded_messages(topics=[CAMERA])]


def decodes(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
    except OSError:
        return False
    return True


def test_a_clean_episode_matches_the_recorders_layout(tmp_path: Path) -> None:
    episode = generate(spec(), tmp_path)
    raw = episode.mcap_path.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == episode.sha256
    with episode.mcap_path.open("rb") as f:
        reader = make_reader(f)
        assert reader.get_header().profile == "ros2"
        summary = reader.get_summary()
        assert summary is not None
        assert {s.name for s in summary.schemas.values()} == {
            "sensor_msgs/msg/Imu",
            "sensor_msgs/msg/CompressedImage",
        }
        assert all(s.data for s in summary.schemas.values())  # full ros2msg definitions
        metadata = {m.name: dict(m.metadata) for m in reader.iter_metadata()}
    assert set(metadata) == {
        "axon.sidecar",
        "axon.task",
        "axon.device",
        "axon.recording",
        "axon.topics",
    }
    assert int(metadata["axon.recording"]["file_size_bytes"]) == episode.size
    assert len(metadata["axon.recording"]["file_size_bytes"]) == 20
    sidecar = json.loads(episode.sidecar_path.read_text())
    assert sidecar["recording"]["checksum_sha256"] == episode.sha256
    assert all(decodes(f) for f in frames(episode.mcap_path))
    assert (tmp_path / "task-g.mcap.done").read_text() == "done\n"


def test_the_size_target_is_met_roughly(tmp_path: Path) -> None:
    episode = generate(spec(target_bytes=8 * 2**20), tmp_path)
    assert 4 * 2**20 < episode.size < 24 * 2**20


@pytest.mark.parametrize("fault", ["corrupt_jpeg", "truncated_jpeg"])
def test_broken_frames_fail_a_full_decode(tmp_path: Path, fault: str) -> None:
    episode = generate(spec(faults=frozenset({fault})), tmp_path)
    results = [decodes(f) for f in frames(episode.mcap_path)]
    assert not all(results)
    assert any(results)


def test_structural_faults(tmp_path: Path) -> None:
    truncated = generate(spec(task_id="t1", faults=frozenset({"truncate"})), tmp_path)
    with truncated.mcap_path.open("rb") as f, pytest.raises(Exception):  # noqa: B017, PT011
        make_reader(f).get_summary()
    dropped = generate(spec(task_id="t2", faults=frozenset({"drop_topic"})), tmp_path)
    assert CAMERA not in dropped.topic_counts
    gapped = generate(spec(task_id="t3", faults=frozenset({"time_gap"})), tmp_path)
    clean = generate(spec(task_id="t4"), tmp_path)
    assert gapped.message_count < clean.message_count
    wrong = generate(spec(task_id="t5", faults=frozenset({"wrong_checksum"})), tmp_path)
    assert (
        json.loads(wrong.sidecar_path.read_text())["recording"]["checksum_sha256"] != wrong.sha256
    )
    other = generate(spec(task_id="t6", faults=frozenset({"sidecar_mismatch"})), tmp_path)
    assert json.loads(other.sidecar_path.read_text())["task"]["task_id"] != "t6"


def test_unknown_faults_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown faults"):
        generate(spec(faults=frozenset({"gremlins"})), tmp_path)


def test_fault_corpus_additions(tmp_path: Path) -> None:
    zero = generate(spec(task_id="z", faults=frozenset({"zero_frames"})), tmp_path)
    assert b"" in frames(zero.mcap_path)
    short = generate(spec(task_id="s", faults=frozenset({"too_short"})), tmp_path)
    assert short.finished_at - short.started_at < (zero.finished_at - zero.started_at)
    garbage = generate(spec(task_id="g", faults=frozenset({"garbage"})), tmp_path)
    assert not garbage.mcap_path.read_bytes().startswith(b"\x89MCAP")
    empty = generate(spec(task_id="e", faults=frozenset({"empty"})), tmp_path)
    assert empty.size == 0
    assert empty.mcap_path.read_bytes() == b""
