"""Task status follows the recorder: forward only, whichever signal comes first (SQLite)."""

from __future__ import annotations

import pytest
from sqlmodel import Session

from keystone_core.errors import ConflictError
from keystone_core.models import Robot, Scene, Task, TaskStatus
from keystone_core.security import callback_token, callback_token_matches
from keystone_core.services import device_tasks, recorder
from keystone_core.services.devices import (
    DeviceEndpoints,
    device_id_for,
    endpoints,
    identity_of,
)
from keystone_core.settings import Settings
from tests.conftest import make_settings
from tests.factories import make_robot, make_task


def robot_task(session: Session, **task: object) -> tuple[Robot, Task]:
    t = make_task(session, **task)
    robot = make_robot(session, factory_id=t.factory_id)
    t.robot_id = robot.id
    session.add(t)
    session.commit()
    return robot, t


def test_advance_walks_forward_through_allowed_edges_and_stamps_times(session: Session) -> None:
    _, task = robot_task(session)
    result = device_tasks.advance_task(session, task, TaskStatus.UPLOADING)
    assert (result.before, result.after) == (TaskStatus.PENDING, TaskStatus.UPLOADING)
    assert task.ready_at is not None  # went through ready


def test_advance_never_moves_backwards_or_out_of_a_final_state(session: Session) -> None:
    _, task = robot_task(session, status=TaskStatus.UPLOADING)
    assert not device_tasks.advance_task(session, task, TaskStatus.IN_PROGRESS).changed
    _, cancelled = robot_task(session, status=TaskStatus.CANCELLED)
    late = device_tasks.advance_task(session, cancelled, TaskStatus.UPLOADING)
    assert late.ignored_as_late
    assert cancelled.status is TaskStatus.CANCELLED


def state(session: Session, robot: Robot, previous: str, current: str, task_id: str | None) -> None:
    recorder.on_state_update(
        session,
        identity_of(robot),
        "no-socket",
        previous=previous,
        current=current,
        task_id=task_id,
        timestamp_ms=1,
    )
    session.commit()


def test_an_idle_snapshot_with_the_task_means_it_finished(session: Session) -> None:
    robot, task = robot_task(session, status=TaskStatus.IN_PROGRESS)
    state(session, robot, "idle", "idle", task.task_id)
    session.refresh(task)
    assert task.status is TaskStatus.UPLOADING


def test_a_fresh_process_snapshot_leaves_the_recording_outcome_unknown(session: Session) -> None:
    robot, recording = robot_task(session, status=TaskStatus.IN_PROGRESS)
    ready = make_task(session, robot_id=robot.id, status=TaskStatus.READY)
    session.commit()
    state(session, robot, "idle", "idle", None)
    session.refresh(recording)
    session.refresh(ready)
    assert recording.status is TaskStatus.IN_PROGRESS
    assert recording.outcome_unknown
    assert ready.status is TaskStatus.PENDING  # the device no longer holds its config


def test_a_failed_begin_drops_the_config(session: Session) -> None:
    robot, task = robot_task(session, status=TaskStatus.READY)
    state(session, robot, "ready", "idle", task.task_id)
    session.refresh(task)
    assert task.status is TaskStatus.PENDING


def test_a_task_of_another_device_is_never_touched(session: Session) -> None:
    robot, _ = robot_task(session)
    _, foreign = robot_task(session, status=TaskStatus.READY)
    state(session, robot, "ready", "recording", foreign.task_id)
    session.refresh(foreign)
    assert foreign.status is TaskStatus.READY


def test_callback_tokens_are_bound_to_one_task_and_the_secret(tmp_path: object) -> None:
    settings = make_settings(tmp_path)  # type: ignore[arg-type]
    token = callback_token(settings, "task-1")
    assert token.startswith("kct_v1_")
    assert token == callback_token(settings, "task-1")
    assert callback_token_matches(settings, "task-1", token)
    assert not callback_token_matches(settings, "task-2", token)
    other = make_settings(tmp_path, secret_key="another-secret-key-0123456789abcdefgh")  # type: ignore[arg-type]
    assert not callback_token_matches(other, "task-1", token)


def test_device_ids_and_endpoints() -> None:
    assert device_id_for(1, 3, 2) == "AB-F0001-T0003-000002"
    assert device_id_for(12345, 3, 1_000_000) == "AB-F12345-T0003-1000000"
    links = endpoints(make_settings_for_base(None), "https://keystone.lan:8443/")
    assert links.recorder_rpc_url("d1") == "ws://keystone.lan:8443/recorder/d1"
    links = endpoints(make_settings_for_base("http://10.0.0.5:8000"), "http://ignored/")
    assert links.transfer_ws_url == "ws://10.0.0.5:8000/transfer"
    assert links.start_callback_url == "http://10.0.0.5:8000/api/v1/callbacks/start"


def make_settings_for_base(base: str | None) -> Settings:
    from keystone_core.settings import load_settings

    return load_settings(env="test", device_base_url=base)


def test_the_task_config_omits_unset_keys_and_sends_ascii(
    session: Session, settings: Settings
) -> None:
    robot, task = robot_task(session)
    scene = Scene(factory_id=task.factory_id, name="厨房")
    session.add(scene)
    session.flush()
    task.scene_id = scene.id
    session.add(task)
    session.commit()
    config = device_tasks.task_config(session, settings, task, DeviceEndpoints("http://h:1"))
    assert None not in config.values()
    assert "subscene" not in config  # unset: omitted, not null (C-CFG-1)
    assert config["scene"] == f"scene-{scene.id}"  # non-ASCII never goes to the device
    assert config["device_id"] == robot.device_id


def test_a_task_id_unsafe_for_file_names_is_refused(session: Session, settings: Settings) -> None:
    _, task = robot_task(session, task_id="../escape")
    with pytest.raises(ConflictError) as raised:
        device_tasks.task_config(session, settings, task, DeviceEndpoints("http://h:1"))
    assert raised.value.code == "task_not_configurable"


def test_replies_without_data_and_to_unknown_requests_are_harmless(session: Session) -> None:
    robot, task = robot_task(session, status=TaskStatus.READY)
    reply = {"message": "Unknown action: x", "request_id": "r", "success": False}
    recorder.on_reply(session, identity_of(robot), "c", None, reply)  # C-REC-14
    session.refresh(task)
    assert task.status is TaskStatus.READY


def test_finish_like_actions_wait_for_the_long_timeout(settings: Settings) -> None:
    from keystone_api.ws.recorder import RecorderHub

    hub = RecorderHub(engine=None, settings=settings)  # type: ignore[arg-type]
    assert hub.timeout_for("finish") == settings.recorder_finish_timeout_s >= 120  # C-REC-9
    assert hub.timeout_for("quit") == settings.recorder_finish_timeout_s
    assert hub.timeout_for("get_state") == settings.recorder_rpc_timeout_s
