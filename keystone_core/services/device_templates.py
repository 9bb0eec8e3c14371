"""The recorder and transfer config files Keystone serves to ``axon-config``.

A robot type without stored ``recorder.yaml`` / ``transfer.yaml`` gets these defaults.
Stored ones are checked on upload: both must keep the episode complete on upload —
sidecar mode (``recording.sidecar.mode: always`` with ``scanner.require_json_sidecar:
true``) and one data directory (``dataset.path`` equal to ``scanner.data_dir``) — because
the transfer program uploads exactly what the recorder finished (axon-protocol.md §10.45).
Every value that differs per device is a ``{{ placeholder }}`` that axon-config fills from
its registration response; no secret is ever stored in a template.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from keystone_core.errors import ValidationFailed
from keystone_core.models import RobotType

RECORDER = "recorder.yaml"
TRANSFER = "transfer.yaml"
DATA_DIR = "/axon/recording"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.]+)\s*\}\}")


def default_recorder(robot_type: RobotType) -> str:
    """Subscriptions come from the type's topics with message types from its sensor suite."""
    types = robot_type.sensor_suite.get("message_types", {}) if robot_type.sensor_suite else {}
    lines = []
    for topic in robot_type.ros_topics:
        message_type = types.get(topic) if isinstance(types, dict) else None
        if isinstance(topic, str) and isinstance(message_type, str) and message_type:
            lines.append(
                f"  - name: {topic}\n    message_type: {message_type}\n"
                "    batch_size: 300\n    flush_interval_ms: 5000\n    qos:\n      mode: auto\n"
            )
    subscriptions = "".join(lines) or (
        "  []  # add this robot type's topics (robot_type.sensor_suite.message_types)\n"
    )
    return f"""# Axon recorder for robot type {robot_type.model} (served by Keystone).
dataset:
  path: {DATA_DIR}
  queue_size: 8192
subscriptions:
{subscriptions}recording:
  profile: ros2
  compression: zstd
  compression_level: 3
  disk_usage:
    enabled: true
    warn_usage_gb: 80
    hard_limit_gb: 100
    max_task_size_gb: 0
    cleanup_enabled: false
  sidecar:
    enabled: true
    mode: always
logging:
  console:
    enabled: true
    level: info
rpc:
  mode: ws_client
  ws_client:
    url: "{{{{ endpoints.recorder_rpc_url }}}}"
    auth_token: "{{{{ ws_client_auth_token }}}}"
    reconnect_initial_delay_ms: 1000
    reconnect_backoff_multiplier: 2.0
    reconnect_max_delay_ms: 60000
    reconnect_jitter_factor: 0.2
    ping_interval_ms: 30000
    ping_timeout_ms: 10000
    time_gap_check_enabled: true
"""


def default_transfer(robot_type: RobotType) -> str:
    return f"""# Axon transfer for robot type {robot_type.model} (served by Keystone).
device_id: "{{{{ device_id }}}}"
factory_id: "{{{{ factory_id }}}}"
ws:
  # axon-transfer appends /<device_id> itself.
  url: "{{{{ endpoints.transfer_ws_url }}}}"
  ping_interval_ms: 30000
  ping_timeout_ms: 10000
scanner:
  data_dir: "{DATA_DIR}"
  require_json_sidecar: true
  completion_marker_suffix: ".done"
uploader:
  state_db_path: "/axon/transfer/transfer_state.db"
  delete_after_upload: true
  failed_uploads_dir: "/axon/transfer/failed_uploads/"
  num_workers: 2
  s3:
    endpoint_url: "{{{{ s3.endpoint_url }}}}"
    bucket: "{{{{ s3.bucket }}}}"
    region: "{{{{ s3.region }}}}"
    access_key: "{{{{ s3.access_key }}}}"
    secret_key: "{{{{ s3.secret_key }}}}"
    part_size: 67108864
  retry:
    max_retries: 5
    initial_delay_ms: 1000
    max_delay_ms: 300000
"""


def default_template(robot_type: RobotType, filename: str) -> str | None:
    if filename == RECORDER:
        return default_recorder(robot_type)
    if filename == TRANSFER:
        return default_transfer(robot_type)
    return None


def _parse(filename: str, content: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(_PLACEHOLDER.sub("placeholder", content))
    except yaml.YAMLError as exc:
        raise ValidationFailed(
            f"{filename} is not valid YAML: {str(exc).splitlines()[0]}",
            code="invalid_yaml",
            field="content",
        ) from None
    if not isinstance(doc, dict):
        raise ValidationFailed(f"{filename} must be a YAML mapping", code="invalid_yaml")
    return doc


def _get(doc: dict[str, Any], *path: str) -> Any:
    node: Any = doc
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def data_dir(filename: str, content: str) -> str | None:
    doc = _parse(filename, content)
    value = (
        _get(doc, "dataset", "path") if filename == RECORDER else _get(doc, "scanner", "data_dir")
    )
    return str(value).rstrip("/") if value is not None else None


def check_device_config(filename: str, content: str, other: str | None) -> None:
    """Refuse a recorder/transfer template that would strand recordings on the device.

    ``other`` is the robot type's other file (stored or default) for the path check.
    """
    if filename not in (RECORDER, TRANSFER):
        return
    doc = _parse(filename, content)
    if filename == RECORDER:
        if (
            _get(doc, "recording", "sidecar", "mode") != "always"
            or _get(doc, "recording", "sidecar", "enabled") is False
        ):
            raise ValidationFailed(
                "recorder.yaml must set recording.sidecar.mode: always (Keystone verifies "
                "every upload against its sidecar)",
                code="sidecar_mode_required",
                field="content",
            )
        if not _get(doc, "dataset", "path"):
            raise ValidationFailed(
                "recorder.yaml must set dataset.path", code="data_path_required", field="content"
            )
    else:
        if _get(doc, "scanner", "require_json_sidecar") is not True:
            raise ValidationFailed(
                "transfer.yaml must set scanner.require_json_sidecar: true (sidecar mode)",
                code="sidecar_required",
                field="content",
            )
        if not _get(doc, "scanner", "data_dir"):
            raise ValidationFailed(
                "transfer.yaml must set scanner.data_dir",
                code="data_path_required",
                field="content",
            )
    if other is not None:
        other_name = TRANSFER if filename == RECORDER else RECORDER
        mine, theirs = data_dir(filename, content), data_dir(other_name, other)
        if theirs is not None and mine != theirs:
            raise ValidationFailed(
                f"{filename}'s data directory {mine!r} differs from {other_name}'s {theirs!r}; "
                "the transfer program would never see the recordings",
                code="data_path_mismatch",
                field="content",
            )
