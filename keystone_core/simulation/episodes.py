"""Axon-format episodes for tests, the simulator and benchmarks (``keystone gen-mcap``).

A generated episode looks like the recorder's: ROS 2 profile, ``cdr`` messages with full
``ros2msg`` schema definitions (``sensor_msgs/msg/Imu``, ``sensor_msgs/msg/CompressedImage``
with real JPEG frames), zstd chunks of 4 MiB, chunk CRCs on and data-section CRC off,
the five ``axon.*`` metadata records (``file_size_bytes`` zero-padded to 20 digits and
patched in place after close, as the recorder does) and the JSON sidecar. Faults can be
injected to exercise QA: a truncated file (mid-data, or inside the summary), a missing
topic, a time gap, corrupt or truncated JPEG frames, zero-byte frames, a recording far too
short, a wrong checksum, a sidecar that disagrees with the MCAP, random garbage instead of
an MCAP, an empty file.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mcap.writer import CompressionType, Writer
from mcap_ros2._dynamic import serialize_dynamic
from PIL import Image

FAULTS = frozenset(
    {
        "truncate",
        "truncate_summary",
        "drop_topic",
        "time_gap",
        "corrupt_jpeg",
        "truncated_jpeg",
        "wrong_checksum",
        "sidecar_mismatch",
        "zero_frames",
        "too_short",
        "garbage",
        "empty",
    }
)
CHUNK_SIZE = 4 * 1024 * 1024
SIZE_PLACEHOLDER = "0" * 20

_TIME = """
================================================================================
MSG: std_msgs/Header
builtin_interfaces/Time stamp
string frame_id
================================================================================
MSG: builtin_interfaces/Time
int32 sec
uint32 nanosec"""

IMU_DEF = (
    """std_msgs/Header header
geometry_msgs/Quaternion orientation
float64[9] orientation_covariance
geometry_msgs/Vector3 angular_velocity
float64[9] angular_velocity_covariance
geometry_msgs/Vector3 linear_acceleration
float64[9] linear_acceleration_covariance"""
    + _TIME
    + """
================================================================================
MSG: geometry_msgs/Quaternion
float64 x
float64 y
float64 z
float64 w
================================================================================
MSG: geometry_msgs/Vector3
float64 x
float64 y
float64 z"""
)

COMPRESSED_IMAGE_DEF = (
    """std_msgs/Header header
string format
uint8[] data"""
    + _TIME
)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    message_type: str  # sensor_msgs/msg/Imu | sensor_msgs/msg/CompressedImage
    rate_hz: float


DEFAULT_TOPICS = (
    TopicSpec("/imu/data", "sensor_msgs/msg/Imu", 100.0),
    TopicSpec("/camera0/rgb/compressed", "sensor_msgs/msg/CompressedImage", 10.0),
)


@dataclass
class EpisodeSpec:
    task_id: str
    device_id: str
    duration_s: float = 10.0
    topics: tuple[TopicSpec, ...] = DEFAULT_TOPICS
    # Approximate file size: camera frames are padded up to it (None = small frames).
    target_bytes: int | None = None
    faults: frozenset[str] = frozenset()
    factory: str = ""
    scene: str = ""
    subscene: str = ""
    skills: tuple[str, ...] = ()
    order_id: str = ""
    data_collector_id: str = ""
    operator_name: str = ""
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    seed: int = 0


@dataclass(frozen=True)
class Episode:
    mcap_path: Path
    sidecar_path: Path
    sha256: str
    size: int
    message_count: int
    started_at: datetime
    finished_at: datetime
    topic_counts: dict[str, int]


# Sensor noise blended into the picture when a size target asks for camera-like frames:
# real frames do not compress to a few KB, and at 0.1 a quality-90 JPEG costs about 0.26
# byte per pixel, like a camera's (~300 KB at 1280x960).
FRAME_NOISE = 0.1
FRAME_QUALITY = 90
MAX_FRAME_WIDTH = 4096
MAX_DISTINCT_FRAMES = 4096  # tiny frames: a chunk holds thousands


def _jpeg(rng: random.Random, width: int, height: int, quality: int, noise: float = 0.0) -> bytes:
    image = Image.new("RGB", (width, height))
    pixels = bytes(rng.randrange(256) for _ in range(48))
    tile = Image.frombytes("RGB", (4, 4), pixels).resize((width, height))
    image.paste(tile)
    if noise:
        grain = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
        image = Image.blend(image, grain, noise)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _frame_shape(rng: random.Random, per_frame: int) -> tuple[int, int]:
    """4:3 dimensions (multiples of 16) whose noisy JPEG is about ``per_frame`` bytes."""
    width, height = 320, 240
    for _ in range(3):  # calibrate on a small frame, then correct twice near the real size
        sample = len(_jpeg(rng, width, height, FRAME_QUALITY, FRAME_NOISE))
        scale = (per_frame / sample) ** 0.5
        width = max(16, min(MAX_FRAME_WIDTH, round(width * scale / 16) * 16))
        height = max(16, round(width * 3 / 4 / 16) * 16)
    return width, height


def _frames(spec: EpisodeSpec, rng: random.Random, camera_messages: int) -> list[bytes]:
    """A few distinct JPEGs (cycled); camera-like ones of the right size for a target.

    Without a target: four small smooth frames. With one: noisy frames sized so the camera
    messages add up to ``target_bytes``, and enough distinct ones that no frame repeats
    inside a chunk — zstd would otherwise store the repeat as a back-reference and the file
    would come out several times smaller than the target."""
    per_frame = 0
    if spec.target_bytes and camera_messages:
        per_frame = max(0, spec.target_bytes // camera_messages)
    if not per_frame:
        return [_jpeg(rng, 160, 120, 80) for _ in range(4)]
    width, height = _frame_shape(rng, per_frame)
    first = _jpeg(rng, width, height, FRAME_QUALITY, FRAME_NOISE)
    distinct = max(4, min(MAX_DISTINCT_FRAMES, -(-CHUNK_SIZE // len(first)) + 1, camera_messages))
    return [first] + [
        _jpeg(rng, width, height, FRAME_QUALITY, FRAME_NOISE) for _ in range(distinct - 1)
    ]


def _iso_ms(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def generate(spec: EpisodeSpec, out_dir: Path) -> Episode:
    """Write ``{task_id}.mcap``, ``{task_id}.json`` and ``{task_id}.mcap.done``."""
    unknown = spec.faults - FAULTS
    if unknown:
        raise ValueError(f"unknown faults: {', '.join(sorted(unknown))}")
    rng = random.Random(spec.seed)  # noqa: S311 (test data, not secrets)
    if "too_short" in spec.faults:
        spec = replace(spec, duration_s=min(spec.duration_s, 0.3))
    out_dir.mkdir(parents=True, exist_ok=True)
    mcap_path = out_dir / f"{spec.task_id}.mcap"
    sidecar_path = out_dir / f"{spec.task_id}.json"
    topics = list(spec.topics)
    if "drop_topic" in spec.faults and len(topics) > 1:
        topics = topics[:-1]  # the last (a camera, by default) never appears
    camera_messages = sum(
        int(t.rate_hz * spec.duration_s) for t in topics if "CompressedImage" in t.message_type
    )
    frames = _frames(spec, rng, camera_messages)
    # Cameras start at different places in the cycle: the same frame on every camera at
    # the same instant would be compressed away (see _frames).
    cameras = [t.name for t in topics if "CompressedImage" in t.message_type]
    shift = {name: k * len(frames) // len(cameras) for k, name in enumerate(cameras)}
    start_ns = int(spec.started_at.timestamp() * 1e9)
    # Every topic falls silent for 2 s (less in short recordings), inside the recording.
    gap_s = min(2.0, spec.duration_s * 0.5)
    gap = (
        (spec.duration_s * 0.4, spec.duration_s * 0.4 + gap_s)
        if "time_gap" in spec.faults
        else None
    )

    counts: dict[str, int] = {}
    with mcap_path.open("wb") as stream:
        writer = Writer(
            stream,
            chunk_size=CHUNK_SIZE,
            compression=CompressionType.ZSTD,
            enable_crcs=True,
            enable_data_crcs=False,
        )
        writer.start(profile="ros2", library="libmcap 2.1.2")
        events: list[tuple[int, str, int]] = []
        channels: dict[str, tuple[int, Callable[[Any], bytes]]] = {}
        for topic in topics:
            definition = IMU_DEF if topic.message_type.endswith("/Imu") else COMPRESSED_IMAGE_DEF
            schema_id = writer.register_schema(
                name=topic.message_type, encoding="ros2msg", data=definition.encode()
            )
            channel_id = writer.register_channel(
                topic=topic.name,
                message_encoding="cdr",
                schema_id=schema_id,
                metadata={"axon.plugin": "ROS2", "axon.source": "ros2"},
            )
            encode = serialize_dynamic(topic.message_type, definition)[topic.message_type]
            channels[topic.name] = (channel_id, encode)
            count = int(topic.rate_hz * spec.duration_s)
            period_ns = int(1e9 / topic.rate_hz)
            for i in range(count):
                offset_ns = i * period_ns + rng.randrange(max(1, period_ns // 20))
                if gap and gap[0] * 1e9 <= offset_ns < gap[1] * 1e9:
                    continue
                events.append((start_ns + offset_ns, topic.name, i))
        events.sort()
        corrupt = {"corrupt_jpeg", "truncated_jpeg"} & spec.faults
        for log_time, name, i in events:
            channel_id, encode = channels[name]
            stamp = {"sec": log_time // 10**9, "nanosec": log_time % 10**9}
            header = {"stamp": stamp, "frame_id": name.strip("/").split("/")[0]}
            message: dict[str, Any]
            if name in channels and any(
                t.name == name and "CompressedImage" in t.message_type for t in topics
            ):
                data = frames[(i + shift[name]) % len(frames)]
                if "zero_frames" in spec.faults and i % 5 == 2:
                    data = b""
                elif corrupt and i % 7 == 3:
                    if "truncated_jpeg" in corrupt:
                        data = data[: len(data) // 2]
                    else:
                        middle = len(data) // 2
                        data = (
                            data[:middle]
                            + bytes(rng.randrange(256) for _ in range(64))
                            + data[middle + 64 :]
                        )
                message = {"header": header, "format": "jpeg", "data": data}
            else:
                vector = {"x": rng.uniform(-1, 1), "y": rng.uniform(-1, 1), "z": 9.8}
                message = {
                    "header": header,
                    "orientation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0},
                    "orientation_covariance": [0.0] * 9,
                    "angular_velocity": vector,
                    "angular_velocity_covariance": [0.0] * 9,
                    "linear_acceleration": vector,
                    "linear_acceleration_covariance": [0.0] * 9,
                }
            writer.add_message(
                channel_id=channel_id,
                log_time=log_time,
                publish_time=log_time,
                data=encode(message),
                sequence=i,
            )
            counts[name] = counts.get(name, 0) + 1
        finished = spec.started_at + timedelta(seconds=spec.duration_s)
        message_count = sum(counts.values())
        summary = [
            {
                "frequency_hz": 0.0,
                "message_count": counts.get(t.name, 0),
                "message_type": t.message_type,
                "topic": t.name,
            }
            for t in topics
        ]
        task = {
            "task_id": spec.task_id,
            "scene": spec.scene,
            "factory": spec.factory,
            **{
                k: v
                for k, v in {
                    "order_id": spec.order_id,
                    "subscene": spec.subscene,
                    "data_collector_id": spec.data_collector_id,
                    "operator_name": spec.operator_name,
                }.items()
                if v
            },
        }
        if spec.skills:
            task["skills"] = json.dumps(list(spec.skills), separators=(",", ":"))
        writer.add_metadata("axon.sidecar", {"version": "1.0", "mcap_file": mcap_path.name})
        writer.add_metadata("axon.task", task)
        writer.add_metadata(
            "axon.device",
            {"device_id": spec.device_id, "hostname": spec.device_id, "ros_distro": "humble"},
        )
        writer.add_metadata(
            "axon.recording",
            {
                "recorder_version": "0.4.0",
                "recording_started_at": _iso_ms(spec.started_at),
                "recording_finished_at": _iso_ms(finished),
                "duration_sec": f"{spec.duration_s:.3f}",
                "message_count": str(message_count),
                "file_size_bytes": SIZE_PLACEHOLDER,
                "topics_recorded": json.dumps([t.name for t in topics], separators=(",", ":")),
            },
        )
        writer.add_metadata(
            "axon.topics", {"topics_summary": json.dumps(summary, separators=(",", ":"))}
        )
        writer.finish()  # type: ignore[no-untyped-call]

    raw = bytearray(mcap_path.read_bytes())
    at = raw.find(SIZE_PLACEHOLDER.encode())
    if at >= 0:  # patched in place after close, as the recorder does
        raw[at : at + 20] = f"{len(raw):020d}".encode()
    if "truncate" in spec.faults:  # cut mid-data: the chunk at the cut is lost
        raw = raw[: int(len(raw) * 0.7)]
    if "truncate_summary" in spec.faults:  # data intact, cut inside the summary section
        (summary_start,) = struct.unpack_from("<Q", raw, len(raw) - 37 + 9)
        raw = raw[: summary_start + (len(raw) - 37 - summary_start) // 2]
    if "garbage" in spec.faults:
        raw = bytearray(rng.randbytes(len(raw)))
    if "empty" in spec.faults:
        raw = bytearray()
    mcap_path.write_bytes(bytes(raw))
    sha256 = hashlib.sha256(raw).hexdigest()

    sidecar = {
        "version": "1.0",
        "mcap_file": mcap_path.name,
        "task": {
            "task_id": spec.task_id,
            "scene": spec.scene,
            "subscene": spec.subscene,
            "factory": spec.factory,
            "order_id": spec.order_id,
            "data_collector_id": spec.data_collector_id,
            "operator_name": spec.operator_name,
            "skills": list(spec.skills),
        },
        "device": {"device_id": spec.device_id, "hostname": spec.device_id, "ros_distro": "humble"},
        "recording": {
            "checksum_sha256": sha256,
            "duration_sec": round(spec.duration_s, 3),
            "file_size_bytes": len(raw),
            "message_count": message_count,
            "recorder_version": "0.4.0",
            "recording_started_at": _iso_ms(spec.started_at),
            "recording_finished_at": _iso_ms(finished),
            "topics_recorded": [t.name for t in topics],
        },
        "topics_summary": summary,
    }
    if "wrong_checksum" in spec.faults:
        sidecar["recording"]["checksum_sha256"] = hashlib.sha256(b"not the file").hexdigest()  # type: ignore[index]
    if "sidecar_mismatch" in spec.faults:
        sidecar["task"]["task_id"] = spec.task_id + "-other"  # type: ignore[index]
        sidecar["device"]["device_id"] = spec.device_id + "-other"  # type: ignore[index]
    sidecar_path.write_text(json.dumps(sidecar, indent=2, sort_keys=True))
    (out_dir / f"{spec.task_id}.mcap.done").write_text("done\n")
    return Episode(
        mcap_path=mcap_path,
        sidecar_path=sidecar_path,
        sha256=sha256,
        size=len(raw),
        message_count=message_count,
        started_at=spec.started_at,
        finished_at=finished,
        topic_counts=counts,
    )
