"""QA previews over the generated fault corpus: a contact sheet of the camera frames and a
message-rate timeline that marks the silences ``message_gaps`` found; every damaged or odd
input gives what can be drawn and a note, never an exception."""

from __future__ import annotations

import io
import struct
from array import array
from pathlib import Path

import numpy as np
import pytest
from mcap.reader import make_reader
from mcap_ros2._dynamic import serialize_dynamic
from PIL import Image

from keystone_core.qa.checks import Expectations, QAConfig, check_message_gaps, silences
from keystone_core.qa.images import RAW, frame_thumbnail
from keystone_core.qa.inventory import ChannelInfo, Inventory
from keystone_core.qa.preview import (
    COLUMNS,
    HEADER_HEIGHT,
    LABEL_HEIGHT,
    TILE_HEIGHT,
    TILE_WIDTH,
    Previews,
    rate_timeline_figure,
    render_previews,
)
from keystone_core.qa.run import AUTO, Report, assess
from keystone_core.qa.source import LocalSource
from keystone_core.settings import load_settings
from keystone_core.simulation.episodes import DEFAULT_TOPICS, EpisodeSpec, generate
from keystone_core.storage import create_s3_client_for_endpoint, free_tcp_ports

REQUIRED = tuple(t.name for t in DEFAULT_TOPICS)
IMU, CAMERA = REQUIRED
FAULTS = (
    "clean",
    "time_gap",
    "drop_topic",
    "corrupt_jpeg",
    "zero_frames",
    "too_short",
    "truncate",
    "truncate_summary",
    "garbage",
    "empty",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preview-corpus")
    out = {}
    for name in FAULTS:
        spec = EpisodeSpec(
            task_id=f"task_{name}",
            device_id="dev-1",
            duration_s=10.0,
            target_bytes=14 * 2**20 if name == "truncate" else None,
            faults=frozenset() if name == "clean" else frozenset({name}),
            seed=7,
        )
        out[name] = generate(spec, root / name).mcap_path
    return out


def _previews(path: Path) -> tuple[Report, Previews]:
    source = LocalSource(path)
    try:
        report = assess(
            source, Expectations(required_topics=REQUIRED), tier=AUTO, keep_inventory=True
        )
        previews = render_previews(
            source, report.inventory, QAConfig(), title=path.stem, required_topics=REQUIRED
        )
    finally:
        source.close()
    return report, previews


def _image(data: bytes | None, fmt: str) -> Image.Image:
    assert data is not None
    image = Image.open(io.BytesIO(data))
    image.load()  # every byte decoded
    assert image.format == fmt
    return image


def test_a_clean_episode_gets_a_contact_sheet_and_a_timeline_without_silences(
    corpus: dict[str, Path],
) -> None:
    report, previews = _previews(corpus["clean"])
    assert report.verdict == "auto_approved"
    sheet = _image(previews.contact_sheet, "JPEG")
    # One row (one camera) of COLUMNS tiles, under the title strip.
    assert sheet.size == (COLUMNS * TILE_WIDTH, HEADER_HEIGHT + TILE_HEIGHT + LABEL_HEIGHT)
    assert previews.tiles == COLUMNS
    assert previews.damaged_tiles == 0
    # All six instants sit in the file's one chunk: read once.
    assert previews.chunks_read == 1
    assert previews.silences == []
    _image(previews.rate_timeline, "PNG")
    assert previews.notes == []


def test_the_timeline_marks_the_silences_message_gaps_found(corpus: dict[str, Path]) -> None:
    report, previews = _previews(corpus["time_gap"])
    assert "message_gaps" in [c.name for c in report.failing()]
    assert report.inventory is not None
    start = report.inventory.start_ns
    assert start is not None
    spans = {
        s.topic: ((s.start_ns - start) / 1e9, (s.end_ns - start) / 1e9) for s in previews.silences
    }
    # The generator silences every topic from 4 s to 6 s of the 10 s recording.
    assert set(spans) == {IMU, CAMERA}
    for left, right in spans.values():
        assert 3.8 <= left <= 4.0
        assert 6.0 <= right <= 6.2
    # The silences are the check's: its longest per topic is the span drawn.
    gaps = check_message_gaps(report.inventory, QAConfig())
    for silence in previews.silences:
        assert gaps.value[silence.topic] == pytest.approx(silence.seconds, abs=1e-3)

    figure = rate_timeline_figure(
        report.inventory, previews.silences, required_topics=REQUIRED, title="gap"
    )
    shaded = {
        str(patch.get_gid()).removeprefix("silence:")
        for ax in figure.axes
        for patch in ax.patches
        if str(patch.get_gid()).startswith("silence:")
    }
    assert shaded == {IMU, CAMERA}
    for ax in figure.axes:
        red = [p for p in ax.patches if str(p.get_gid()).startswith("silence:")]
        assert len(red) == 1
        assert red[0].get_facecolor()[:3] == pytest.approx((1.0, 0.0, 0.0))
        labels = [t.get_text() for t in ax.texts if str(t.get_gid()).startswith("silence-label")]
        assert len(labels) == 1
        assert labels[0].startswith("silent 2.")
    _image(previews.rate_timeline, "PNG")


def test_a_clean_timeline_has_one_row_per_topic_and_no_red(corpus: dict[str, Path]) -> None:
    report, previews = _previews(corpus["clean"])
    assert report.inventory is not None
    figure = rate_timeline_figure(report.inventory, previews.silences, required_topics=REQUIRED)
    assert [ax.get_ylabel() for ax in figure.axes] == sorted(REQUIRED)
    assert not [p for ax in figure.axes for p in ax.patches if p.get_gid()]


def test_a_missing_camera_has_no_sheet_and_an_absent_row_in_the_timeline(
    corpus: dict[str, Path],
) -> None:
    report, previews = _previews(corpus["drop_topic"])
    assert previews.contact_sheet is None
    assert previews.notes == ["no contact sheet: no image topics"]
    _image(previews.rate_timeline, "PNG")
    assert report.inventory is not None
    figure = rate_timeline_figure(report.inventory, [], required_topics=REQUIRED)
    rows = {ax.get_ylabel(): [t.get_text() for t in ax.texts] for ax in figure.axes}
    assert rows[CAMERA] == ["absent (required topic)"]
    assert rows[IMU] != ["absent (required topic)"]


def test_a_damaged_frame_is_drawn_outlined_with_its_reason(corpus: dict[str, Path]) -> None:
    _report, previews = _previews(corpus["corrupt_jpeg"])
    _image(previews.contact_sheet, "JPEG")
    # Every 7th frame is damaged; the 8 s column of this seed lands on one (frame 80).
    assert previews.damaged_tiles >= 1
    assert previews.tiles == COLUMNS  # a lenient decode still draws what is there


@pytest.mark.parametrize("name", ["zero_frames", "too_short", "truncate", "truncate_summary"])
def test_odd_and_truncated_files_still_get_what_can_be_drawn(
    corpus: dict[str, Path], name: str
) -> None:
    report, previews = _previews(corpus[name])
    assert report.inventory is not None
    _image(previews.contact_sheet, "JPEG")
    _image(previews.rate_timeline, "PNG")
    assert previews.chunks_read <= COLUMNS


@pytest.mark.parametrize("name", ["garbage", "empty"])
def test_unreadable_files_get_no_preview_and_a_note(corpus: dict[str, Path], name: str) -> None:
    report, previews = _previews(corpus[name])
    assert report.verdict == "qa_failed"
    assert previews.contact_sheet is None
    assert previews.rate_timeline is None
    assert previews.notes == ["no preview: the file could not be read"]


def test_a_chunk_that_does_not_open_leaves_marked_tiles_not_an_exception(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    path = corpus["clean"]
    with path.open("rb") as stream:
        summary = make_reader(stream).get_summary()
    assert summary is not None
    chunk = summary.chunk_indexes[0]
    data = bytearray(path.read_bytes())
    middle = chunk.chunk_start_offset + chunk.chunk_length // 2
    data[middle : middle + 256] = bytes(256)  # zeroes inside the zstd stream
    damaged = tmp_path / "damaged.mcap"
    damaged.write_bytes(bytes(data))
    _report, previews = _previews(damaged)
    _image(previews.contact_sheet, "JPEG")
    assert previews.tiles == 0
    assert previews.damaged_tiles == COLUMNS
    _image(previews.rate_timeline, "PNG")


def _inventory(times: dict[str, list[int]]) -> Inventory:
    inventory = Inventory(size=1000, tier="fast")
    for cid, (topic, values) in enumerate(times.items(), start=1):
        inventory.channels[cid] = ChannelInfo(cid, topic, 0, "cdr")
        inventory.times[cid] = array("q", values)
        inventory.sizes[cid] = array("q", [100] * len(values))
    inventory.finish()
    return inventory


def test_the_timeline_copes_with_empty_single_message_and_absent_topics() -> None:
    second = 10**9
    inventory = _inventory(
        {"/steady": list(range(0, 5 * second, second // 10)), "/once": [second], "/never": []}
    )
    found = silences(inventory, QAConfig())
    assert {s.topic for s in found} == set()  # 1 message: no rate, no silence
    figure = rate_timeline_figure(inventory, found, required_topics=("/steady", "/lidar"))
    rows = {ax.get_ylabel(): [t.get_text() for t in ax.texts] for ax in figure.axes}
    assert rows["/never"] == ["no messages"]
    assert rows["/lidar"] == ["absent (required topic)"]
    assert rows["/once"][0].startswith("1 msgs")
    nothing = Inventory(size=10, tier="fast")
    nothing.finish()
    assert len(rate_timeline_figure(nothing, [], required_topics=()).axes) == 1


def test_silences_include_the_start_and_the_end_of_the_recording() -> None:
    second = 10**9
    inventory = _inventory(
        {
            "/late": list(range(3 * second, 10 * second, second // 10)),
            "/whole": list(range(0, 10 * second + 1, second // 10)),
        }
    )
    found = silences(inventory, QAConfig())
    assert [(s.topic, s.start_ns, s.end_ns) for s in found] == [("/late", 0, 3 * second)]


# --- raw frames -----------------------------------------------------------------------------

IMAGE_DEF = """std_msgs/Header header
uint32 height
uint32 width
string encoding
uint8 is_bigendian
uint32 step
uint8[] data
================================================================================
MSG: std_msgs/Header
builtin_interfaces/Time stamp
string frame_id
================================================================================
MSG: builtin_interfaces/Time
int32 sec
uint32 nanosec"""


def _raw(encoding: str, pixels: np.ndarray) -> bytes:
    encode = serialize_dynamic("sensor_msgs/msg/Image", IMAGE_DEF)["sensor_msgs/msg/Image"]
    height, width = pixels.shape[:2]
    return encode(
        {
            "header": {"stamp": {"sec": 0, "nanosec": 0}, "frame_id": "cam"},
            "height": height,
            "width": width,
            "encoding": encoding,
            "is_bigendian": 0,
            "step": pixels.nbytes // height,
            "data": pixels.tobytes(),
        }
    )


def test_raw_frames_are_drawn_small_and_unknown_encodings_are_said() -> None:
    rgb = np.zeros((480, 640, 3), dtype=np.uint8)
    rgb[:, :, 0] = 255  # red
    drawn = frame_thumbnail(RAW, _raw("rgb8", rgb), TILE_WIDTH, TILE_HEIGHT)
    assert drawn.problem is None
    assert drawn.image is not None
    assert drawn.image.size == (TILE_WIDTH, TILE_HEIGHT)
    assert drawn.image.getpixel((10, 10)) == (255, 0, 0)
    bgr = frame_thumbnail(RAW, _raw("bgr8", rgb), TILE_WIDTH, TILE_HEIGHT)
    assert bgr.image is not None
    assert bgr.image.getpixel((10, 10)) == (0, 0, 255)
    depth = np.full((120, 160), 1000, dtype="<u2")
    mono = frame_thumbnail(RAW, _raw("16UC1", depth), TILE_WIDTH, TILE_HEIGHT)
    assert mono.image is not None
    assert mono.image.mode == "L"
    odd = frame_thumbnail(RAW, _raw("bayer_rggb8", rgb[:, :, 0]), TILE_WIDTH, TILE_HEIGHT)
    assert odd.image is None
    assert "bayer_rggb8" in str(odd.problem)
    cut = frame_thumbnail(RAW, _raw("rgb8", rgb)[:-100], TILE_WIDTH, TILE_HEIGHT)
    assert cut.image is None
    assert cut.problem


# --- storing: a store that is down is a note, never an exception ---------------------------


def test_publishing_previews_to_a_store_that_is_down_is_a_note(corpus: dict[str, Path]) -> None:
    from keystone_core.services.previews import preview_keys, publish_previews, wanted

    settings = load_settings(env="test")
    assert wanted(settings, "needs_inspection")
    assert wanted(settings, "qa_failed")
    assert not wanted(settings, "auto_approved")
    assert not wanted(load_settings(env="test", qa_preview="off"))
    keys = preview_keys(settings, 7, "episode_x/../y")
    assert keys["contact_sheet"] == "_keystone/derived/7/episode_x_.._y/contact_sheet.jpg"

    report, _ = _previews(corpus["time_gap"])
    (port,) = free_tcp_ports(1)
    dead = create_s3_client_for_endpoint(
        f"http://127.0.0.1:{port}", access_key="k", secret_key="s", health=True
    )
    record = publish_previews(
        dead,
        settings,
        factory_id=7,
        episode_id="episode_gap",
        bucket="edge-7",
        key="7/dev-1/2026-11-20/task_time_gap.mcap",
        report=report,
        expectations=Expectations(required_topics=REQUIRED),
        config=QAConfig(),
    )
    assert record["contact_sheet"] is None
    assert record["rate_timeline"] is None
    assert record["generated_at"]
    assert any("not stored" in note for note in record["notes"])


def test_cdr_payload_shorter_than_its_header_is_a_problem_not_a_crash() -> None:
    assert frame_thumbnail("compressed", b"\x00\x01", 10, 10).problem
    assert frame_thumbnail("compressed", struct.pack("<I", 0), 10, 10).problem
