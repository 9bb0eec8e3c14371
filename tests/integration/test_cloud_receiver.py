"""The reference cloud receiver over real sockets, on SeaweedFS and on SQLite and MariaDB.

Senders here are plain httpx calls: POST the manifest, PUT bytes to the presigned URLs,
POST complete — exactly what docs/sync.md ("Cloud receiver protocol") promises a sender.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pymysql
import pytest

from keystone_core.storage import EmbeddedS3Server, free_tcp_ports
from keystone_receiver.settings import MIB
from tests.conftest import unavailable
from tests.support.faultproxy import FaultProxy
from tests.support.receiver import (
    Backend,
    LiveReceiver,
    new_token,
    receiver_database_url,
    receiver_settings,
    running_receiver,
)

pytestmark = pytest.mark.integration

EPISODE = "/api/v1/sync/episode"
T = TypeVar("T")


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "mariadb"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh receiver database per backend, shared by every receiver of this module."""
    backend: Backend = request.param
    try:
        return receiver_database_url(backend, tmp_path_factory.mktemp("receiver"))
    except pymysql.err.OperationalError as exc:
        unavailable(f"MariaDB ({exc.args[-1]})")
        raise


@pytest.fixture(scope="module")
def receiver(database_url: str, s3_server: EmbeddedS3Server) -> Iterator[LiveReceiver]:
    """A receiver with the default settings (16 MiB threshold and parts)."""
    with running_receiver(receiver_settings(s3_server, database_url)) as live:
        yield live


@pytest.fixture(scope="module")
def client(receiver: LiveReceiver) -> Iterator[httpx.Client]:
    with receiver.client() as c:
        yield c


# One client for every PUT to S3: building an httpx client (its TLS context) costs ~50 ms.
SENDER = httpx.Client(timeout=60)


@pytest.fixture(scope="module", autouse=True)
def _close_sender() -> Iterator[None]:
    yield
    SENDER.close()


# --- a sender, by hand ------------------------------------------------------------------


@dataclass
class Episode:
    files: dict[str, bytes]
    episode_id: str = field(default_factory=lambda: f"ep-{uuid.uuid4().hex[:12]}")
    factory_id: str = "factory-7"
    device_id: str = "robot:arm-01"
    task_id: str = field(default_factory=lambda: f"task-{uuid.uuid4().hex[:8]}")

    def manifest(self, **changes: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "episode_id": self.episode_id,
            "factory_id": self.factory_id,
            "device_id": self.device_id,
            "task_id": self.task_id,
            "objects": [
                {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                for name, data in self.files.items()
            ],
            "metadata": {"robot_type": "arm", "duration_s": 12.5, "topics": ["/imu"]},
        }
        body.update(changes)
        return body

    def key(self, name: str) -> str:
        return f"{self.factory_id}/{self.device_id}/{self.episode_id}/{name}"


def episode(**sizes: int) -> Episode:
    """Random content: ``episode(**{"a.mcap": 40 * MIB})``."""
    return Episode({name: os.urandom(size) for name, size in sizes.items()})


def by_name(opened: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {u["name"]: u for u in opened["uploads"]}


def put(url: str, data: bytes) -> httpx.Response:
    return SENDER.put(url, content=data)


def upload(
    opened: dict[str, Any],
    files: dict[str, bytes],
    *,
    only: Callable[[str, int], bool] | None = None,
) -> None:
    """PUT every object and part not yet done (``only(name, part_number)`` filters; 0 = whole)."""
    for item in opened["uploads"]:
        if item["done"]:
            continue
        data = files[item["name"]]
        if "url" in item:
            if only is None or only(item["name"], 0):
                assert put(item["url"], data).status_code == 200
            continue
        for part in item["parts"]:
            if part["done"] or (only is not None and not only(item["name"], part["part_number"])):
                continue
            start = (part["part_number"] - 1) * item["part_size"]
            assert put(part["url"], data[start : start + part["size"]]).status_code == 200


def open_session(client: httpx.Client, ep: Episode, **changes: Any) -> dict[str, Any]:
    response = client.post(EPISODE, json=ep.manifest(**changes))
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def complete(client: httpx.Client, ep: Episode, session: str) -> httpx.Response:
    return client.post(f"{EPISODE}/{ep.episode_id}/complete", json={"session": session})


def upload_id_of(part_url: str) -> str:
    return parse_qs(urlsplit(part_url).query)["uploadId"][0]


def together(count: int, work: Callable[[], T]) -> list[T]:
    """Run ``work`` in ``count`` threads released at the same moment."""
    barrier = threading.Barrier(count)
    results: list[T] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            barrier.wait(timeout=10)
            result = work()
            with lock:
                results.append(result)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert len(results) == count
    return results


# --- the happy path ---------------------------------------------------------------------


def test_small_empty_and_multipart_objects_sync_and_verify(
    client: httpx.Client, receiver: LiveReceiver
) -> None:
    ep = episode(**{"episode.json": 2048, "episode.done": 0, "episode.mcap": 40 * MIB})
    opened = open_session(client, ep)
    uploads = by_name(opened)
    assert opened["episode_id"] == ep.episode_id
    assert list(uploads) == ["episode.json", "episode.done", "episode.mcap"]  # manifest order

    small = uploads["episode.json"]
    assert small["key"] == ep.key("episode.json")
    assert small["done"] is False
    assert small["url"].startswith(receiver.settings.s3_endpoint_url or "")
    assert "parts" not in small
    assert "part_size" not in small

    big = uploads["episode.mcap"]
    assert "url" not in big
    assert big["part_size"] == 16 * MIB
    assert [(p["part_number"], p["size"], p["done"]) for p in big["parts"]] == [
        (1, 16 * MIB, False),
        (2, 16 * MIB, False),
        (3, 8 * MIB, False),
    ]
    assert len({upload_id_of(p["url"]) for p in big["parts"]}) == 1

    upload(opened, ep.files)
    done = complete(client, ep, opened["session"])
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["episode_id"] == ep.episode_id
    assert body["synced_at"].endswith("Z")
    assert body["objects"] == [
        {
            "name": name,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "key": ep.key(name),
        }
        for name, data in ep.files.items()
    ]
    store = receiver.backends.store
    for name, data in ep.files.items():
        assert store.sha256_of(ep.key(name)) == (hashlib.sha256(data).hexdigest(), len(data))

    state = client.get(f"{EPISODE}/{ep.episode_id}").json()
    assert state["status"] == "complete"
    assert state["synced_at"] == body["synced_at"]
    assert (state["session_count"], state["complete_count"]) == (1, 1)
    assert all(o["done"] for o in state["objects"])


def test_health_needs_no_token(receiver: LiveReceiver) -> None:
    response = httpx.get(f"{receiver.base_url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


# --- resumability -----------------------------------------------------------------------


def test_resume_hands_out_only_what_is_missing(
    client: httpx.Client, receiver: LiveReceiver
) -> None:
    ep = episode(**{"meta.json": 512, "data.mcap": 40 * MIB})
    first = open_session(client, ep)
    upload(first, ep.files, only=lambda name, part: part == 1)  # one part, nothing else

    again = open_session(client, ep)
    assert again["session"] == first["session"]
    uploads = by_name(again)
    assert uploads["meta.json"]["done"] is False
    assert "url" in uploads["meta.json"]
    parts = uploads["data.mcap"]["parts"]
    assert [p["done"] for p in parts] == [True, False, False]
    assert upload_id_of(parts[0]["url"]) == upload_id_of(
        by_name(first)["data.mcap"]["parts"][0]["url"]
    )

    # Completing early names what is missing and keeps the parts already stored.
    early = complete(client, ep, first["session"])
    assert early.status_code == 422
    assert early.json()["code"] == "object_mismatch"
    assert {o["name"]: (o["reason"], o.get("missing_parts")) for o in early.json()["objects"]} == {
        "meta.json": ("missing", None),
        "data.mcap": ("missing", [2, 3]),
    }
    resumed = open_session(client, ep)
    assert [p["done"] for p in by_name(resumed)["data.mcap"]["parts"]] == [True, False, False]

    upload(resumed, ep.files)
    assert complete(client, ep, first["session"]).status_code == 200
    state = receiver.state(ep.episode_id)
    assert state is not None
    assert (state.session_count, state.complete_count) == (1, 1)


def test_a_verified_object_stays_done_while_a_bad_one_is_handed_out_again(
    client: httpx.Client, receiver: LiveReceiver
) -> None:
    ep = episode(**{"good.json": 300, "bad.mcap": 4000})
    opened = open_session(client, ep)
    upload(opened, {**ep.files, "bad.mcap": os.urandom(4000)})  # same size, other bytes

    refused = complete(client, ep, opened["session"])
    assert refused.status_code == 422
    body = refused.json()
    assert body["code"] == "object_mismatch"
    assert "bad.mcap" in body["message"]
    (mismatch,) = body["objects"]
    assert mismatch["name"] == "bad.mcap"
    assert mismatch["reason"] == "sha256"
    assert mismatch["expected"] == hashlib.sha256(ep.files["bad.mcap"]).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", mismatch["actual"])
    assert receiver.backends.store.size_of(ep.key("bad.mcap")) is None  # reset

    again = open_session(client, ep)
    assert again["session"] == opened["session"]
    uploads = by_name(again)
    assert uploads["good.json"] == {
        "name": "good.json",
        "size": 300,
        "key": ep.key("good.json"),
        "done": True,
    }
    assert uploads["bad.mcap"]["done"] is False
    assert uploads["bad.mcap"]["url"]
    upload(again, ep.files)
    assert complete(client, ep, opened["session"]).status_code == 200


def test_a_multipart_object_with_wrong_bytes_gets_a_new_upload(
    client: httpx.Client, receiver: LiveReceiver
) -> None:
    ep = episode(**{"big.mcap": 17 * MIB})
    opened = open_session(client, ep)
    upload(opened, {"big.mcap": os.urandom(17 * MIB)})
    refused = complete(client, ep, opened["session"])
    assert refused.status_code == 422
    assert refused.json()["objects"][0]["reason"] == "sha256"

    again = open_session(client, ep)
    parts = by_name(again)["big.mcap"]["parts"]
    assert [p["done"] for p in parts] == [False, False]
    old_upload = upload_id_of(by_name(opened)["big.mcap"]["parts"][0]["url"])
    assert upload_id_of(parts[0]["url"]) != old_upload
    upload(again, ep.files)
    assert complete(client, ep, again["session"]).status_code == 200


def test_size_mismatch_and_missing_object(client: httpx.Client, receiver: LiveReceiver) -> None:
    ep = episode(**{"short.bin": 1000, "absent.bin": 10})
    opened = open_session(client, ep)
    assert put(by_name(opened)["short.bin"]["url"], ep.files["short.bin"][:600]).status_code == 200

    refused = complete(client, ep, opened["session"])
    assert refused.status_code == 422
    found = {o["name"]: o for o in refused.json()["objects"]}
    assert found["short.bin"] == {
        "name": "short.bin",
        "reason": "size",
        "expected": 1000,
        "actual": 600,
    }
    assert found["absent.bin"] == {
        "name": "absent.bin",
        "reason": "missing",
        "expected": 10,
        "actual": None,
    }
    state = receiver.state(ep.episode_id)
    assert state is not None
    assert state.status == "incomplete"
    assert state.complete_count == 0


# --- exactly once -----------------------------------------------------------------------


def synced(client: httpx.Client, ep: Episode) -> dict[str, Any]:
    opened = open_session(client, ep)
    upload(opened, ep.files)
    response = complete(client, ep, opened["session"])
    assert response.status_code == 200, response.text
    return {**response.json(), "session": opened["session"]}


def test_a_complete_episode_answers_409_with_synced_at(client: httpx.Client) -> None:
    ep = episode(**{"a.json": 10})
    done = synced(client, ep)
    duplicate = client.post(EPISODE, json=ep.manifest())
    assert duplicate.status_code == 409
    assert duplicate.json() == {
        "code": "already_synced",
        "message": duplicate.json()["message"],
        "episode_id": ep.episode_id,
        "synced_at": done["synced_at"],
    }
    # Even with another manifest: a complete episode never opens a session again.
    changed = client.post(EPISODE, json=Episode({"b.json": b"x"}, ep.episode_id).manifest())
    assert changed.status_code == 409


def test_repeated_complete_is_200_and_counts_once(
    client: httpx.Client, receiver: LiveReceiver
) -> None:
    ep = episode(**{"a.json": 10, "b.mcap": 17 * MIB})
    done = synced(client, ep)
    for session in (done["session"], "an-old-session"):
        again = complete(client, ep, session)
        assert again.status_code == 200
        assert again.json()["synced_at"] == done["synced_at"]
        assert again.json()["objects"] == done["objects"]
    state = receiver.state(ep.episode_id)
    assert state is not None
    assert (state.status, state.session_count, state.complete_count) == ("complete", 1, 1)


def test_concurrent_first_posts_open_one_session(
    client: httpx.Client, receiver: LiveReceiver
) -> None:
    ep = episode(**{"a.json": 100, "b.mcap": 17 * MIB})
    results = together(4, lambda: client.post(EPISODE, json=ep.manifest()))
    assert [r.status_code for r in results] == [202] * 4
    assert len({r.json()["session"] for r in results}) == 1
    upload_ids = {upload_id_of(by_name(r.json())["b.mcap"]["parts"][0]["url"]) for r in results}
    assert len(upload_ids) == 1  # one multipart upload, not one per racing sender
    state = receiver.state(ep.episode_id)
    assert state is not None
    assert state.session_count == 1


def test_concurrent_completes_record_one_completion(
    client: httpx.Client, receiver: LiveReceiver
) -> None:
    ep = episode(**{"a.json": 100, "b.mcap": 17 * MIB})
    opened = open_session(client, ep)
    upload(opened, ep.files)
    results = together(4, lambda: complete(client, ep, opened["session"]))
    assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
    assert len({r.json()["synced_at"] for r in results}) == 1
    state = receiver.state(ep.episode_id)
    assert state is not None
    assert (state.status, state.session_count, state.complete_count) == ("complete", 1, 1)
    assert receiver.backends.store.sha256_of(ep.key("b.mcap")) == (
        hashlib.sha256(ep.files["b.mcap"]).hexdigest(),
        17 * MIB,
    )


# --- sessions ---------------------------------------------------------------------------


def test_a_changed_manifest_replaces_the_session(
    client: httpx.Client, receiver: LiveReceiver
) -> None:
    ep = episode(**{"kept.json": 100, "changed.mcap": 17 * MIB, "dropped.json": 50})
    first = open_session(client, ep)
    old_upload = upload_id_of(by_name(first)["changed.mcap"]["parts"][0]["url"])
    upload(first, ep.files, only=lambda name, part: name != "changed.mcap" or part == 1)
    assert complete(client, ep, first["session"]).status_code == 422  # verifies kept.json
    store = receiver.backends.store
    assert store.size_of(ep.key("dropped.json")) == 50

    ep.files = {"kept.json": ep.files["kept.json"], "changed.mcap": os.urandom(17 * MIB)}
    second = open_session(client, ep)
    assert second["session"] != first["session"]
    uploads = by_name(second)
    assert list(uploads) == ["kept.json", "changed.mcap"]
    assert uploads["kept.json"]["done"] is True  # same name, size and sha256: kept
    parts = uploads["changed.mcap"]["parts"]
    assert [p["done"] for p in parts] == [False, False]
    assert upload_id_of(parts[0]["url"]) != old_upload
    # The old multipart upload is aborted and the dropped object deleted.
    sizes = {1: 16 * MIB, 2: MIB}
    assert store.stored_parts(ep.key("changed.mcap"), old_upload, sizes) is None
    assert store.size_of(ep.key("dropped.json")) is None

    stale = complete(client, ep, first["session"])
    assert stale.status_code == 409
    assert stale.json()["code"] == "session_mismatch"
    assert stale.json()["session"] == second["session"]

    upload(second, ep.files)
    assert complete(client, ep, second["session"]).status_code == 200
    state = client.get(f"{EPISODE}/{ep.episode_id}").json()
    assert (state["session_count"], state["complete_count"]) == (2, 1)
    assert [o["name"] for o in state["objects"]] == ["kept.json", "changed.mcap"]


def test_episode_ids_are_case_sensitive(client: httpx.Client) -> None:
    ep = episode(**{"a.json": 1})
    lower = open_session(client, ep, episode_id=ep.episode_id.lower())
    upper = open_session(client, ep, episode_id=ep.episode_id.upper())
    assert lower["session"] != upper["session"]


def test_unknown_episodes_are_404(client: httpx.Client) -> None:
    for response in (
        client.get(f"{EPISODE}/never-announced"),
        client.post(f"{EPISODE}/never-announced/complete", json={"session": "s"}),
    ):
        assert response.status_code == 404
        assert response.json()["code"] == "unknown_episode"


# --- auth -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-of-some-length"},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
    ids=["none", "wrong", "empty", "basic"],
)
def test_every_route_but_health_needs_the_token(
    receiver: LiveReceiver, headers: dict[str, str]
) -> None:
    ep = episode(**{"a.json": 1})
    with httpx.Client(base_url=receiver.base_url, headers=headers) as anonymous:
        answers = [
            anonymous.post(EPISODE, json=ep.manifest()),
            anonymous.post(
                EPISODE, content=b"{not json", headers={"Content-Type": "application/json"}
            ),
            anonymous.post(f"{EPISODE}/{ep.episode_id}/complete", json={"session": "s"}),
            anonymous.get(f"{EPISODE}/{ep.episode_id}"),
        ]
        assert anonymous.get("/health").status_code == 200
    for response in answers:
        assert response.status_code == 401, response.text
        assert response.json() == {"code": "unauthorized", "message": response.json()["message"]}
        assert response.headers["www-authenticate"] == "Bearer"
    assert receiver.state(ep.episode_id) is None


def test_the_token_is_compared_exactly(receiver: LiveReceiver) -> None:
    token = receiver.token
    assert token is not None
    for near in (token[:-1], token + "x", token.upper(), f" {token}x"):
        response = httpx.get(
            f"{receiver.base_url}{EPISODE}/x", headers={"Authorization": f"Bearer {near}"}
        )
        assert response.status_code == 401
    ok = httpx.get(f"{receiver.base_url}{EPISODE}/x", headers={"Authorization": f"bearer {token}"})
    assert ok.status_code == 404  # authenticated; the scheme is case-insensitive


# --- validation -------------------------------------------------------------------------

VALID = Episode({"a.json": b"{}"}, episode_id="ep-valid")
SHA = hashlib.sha256(b"x").hexdigest()


def _objects(*items: dict[str, Any]) -> dict[str, Any]:
    return {"objects": list(items)}


def _obj(**changes: Any) -> dict[str, Any]:
    return {"name": "a.json", "size": 1, "sha256": SHA, **changes}


BAD_MANIFESTS: dict[str, dict[str, Any]] = {
    "episode_id with a slash": {"episode_id": "a/b"},
    "episode_id empty": {"episode_id": ""},
    "episode_id starting with a dash": {"episode_id": "-a"},
    "episode_id too long": {"episode_id": "e" * 129},
    "episode_id a number": {"episode_id": 12},
    "factory_id with a space": {"factory_id": "f 1"},
    "device_id non-ascii": {"device_id": "röbot"},
    "task_id missing": {"task_id": None},
    "no objects": _objects(),
    "objects not a list": {"objects": {"name": "a"}},
    "too many objects": _objects(*[_obj(name=f"o{i}") for i in range(17)]),
    "duplicate names": _objects(_obj(), _obj()),
    "name with ..": _objects(_obj(name="a..json")),
    "name with a slash": _objects(_obj(name="dir/a.json")),
    "name starting with a dot": _objects(_obj(name=".hidden")),
    "name with a colon": _objects(_obj(name="a:b")),
    "name too long": _objects(_obj(name="n" * 129)),
    "negative size": _objects(_obj(size=-1)),
    "size above 5 TiB": _objects(_obj(size=5 * 1024**4 + 1)),
    "size as a string": _objects(_obj(size="1")),
    "size as a float": _objects(_obj(size=1.5)),
    "size as a bool": _objects(_obj(size=True)),
    "sha256 upper case": _objects(_obj(sha256=SHA.upper())),
    "sha256 too short": _objects(_obj(sha256=SHA[:63])),
    "sha256 missing": _objects({"name": "a.json", "size": 1}),
    "metadata over 64 KiB": {"metadata": {"blob": "x" * (64 * 1024)}},
    "metadata not an object": {"metadata": ["a"]},
    "metadata missing": {"metadata": None},
}


@pytest.mark.parametrize("changes", BAD_MANIFESTS.values(), ids=BAD_MANIFESTS.keys())
def test_invalid_manifests_are_422(client: httpx.Client, changes: dict[str, Any]) -> None:
    body = {k: v for k, v in {**VALID.manifest(), **changes}.items() if v is not None}
    response = client.post(EPISODE, json=body)
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["code"] == "invalid_request"
    assert answer["message"]
    assert answer["detail"]
    assert all({"loc", "msg", "type"} <= set(d) for d in answer["detail"])


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"[]", "application/json"),
        (b"\xff\xfe", "application/json"),
        (b'{"episode_id": "x"}', "text/plain"),
    ],
    ids=["broken", "a list", "not utf-8", "not json content type"],
)
def test_malformed_bodies_are_422(client: httpx.Client, content: bytes, content_type: str) -> None:
    response = client.post(EPISODE, content=content, headers={"Content-Type": content_type})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_request"


def test_invalid_complete_requests_are_422(client: httpx.Client) -> None:
    for path, body in [
        (f"{EPISODE}/ep-1/complete", {}),
        (f"{EPISODE}/ep-1/complete", {"session": "has space"}),
        (f"{EPISODE}/ep-1/complete", {"session": "s" * 65}),
        (f"{EPISODE}/bad%20id/complete", {"session": "s"}),
        (f"{EPISODE}/-x/complete", {"session": "s"}),
    ]:
        response = client.post(path, json=body)
        assert response.status_code == 422, (path, body, response.text)
        assert response.json()["code"] == "invalid_request"
    assert client.get(f"{EPISODE}/bad%20id").status_code == 422


def test_oversized_bodies_are_413(client: httpx.Client) -> None:
    huge = b'{"metadata": "' + b"x" * (2 * MIB) + b'"}'
    sized = client.post(EPISODE, content=huge, headers={"Content-Type": "application/json"})
    streamed = client.post(
        EPISODE,
        content=iter([huge[:MIB], huge[MIB:]]),
        headers={"Content-Type": "application/json"},
    )
    for response in (sized, streamed):
        assert response.status_code == 413
        assert response.json()["code"] == "payload_too_large"


def test_unknown_routes_and_methods_answer_json(client: httpx.Client) -> None:
    missing = client.get("/api/v1/sync/nothing-here")
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
    wrong = client.delete(f"{EPISODE}/ep-1")
    assert (wrong.status_code, wrong.json()["code"]) == (405, "method_not_allowed")


# --- through a proxy, with faults -------------------------------------------------------

PART_2 = r"[?&]partNumber=2(&|$)"


@pytest.fixture
def proxy(s3_server: EmbeddedS3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url) as p:
        yield p


def test_presigned_urls_name_the_public_endpoint_and_survive_a_failed_part(
    database_url: str, s3_server: EmbeddedS3Server, proxy: FaultProxy
) -> None:
    settings = receiver_settings(
        s3_server,
        database_url,
        public_s3_endpoint_url=proxy.url,
        multipart_threshold=5 * MIB,
        part_size=5 * MIB,
    )
    ep = episode(**{"a.json": 1000, "b.mcap": 12 * MIB})
    with running_receiver(settings) as receiver, receiver.client() as client:
        opened = open_session(client, ep)
        uploads = by_name(opened)
        assert uploads["a.json"]["url"].startswith(proxy.url + "/")
        parts = uploads["b.mcap"]["parts"]
        assert [p["size"] for p in parts] == [5 * MIB, 5 * MIB, 2 * MIB]
        assert all(p["url"].startswith(proxy.url + "/") for p in parts)

        proxy.fail("PUT", PART_2, status=500, times=1)
        assert put(uploads["a.json"]["url"], ep.files["a.json"]).status_code == 200
        data = ep.files["b.mcap"]
        codes = [
            put(p["url"], data[(p["part_number"] - 1) * 5 * MIB :][: p["size"]]).status_code
            for p in parts
        ]
        assert codes == [200, 500, 200]

        again = open_session(client, ep)
        assert [p["done"] for p in by_name(again)["b.mcap"]["parts"]] == [True, False, True]
        upload(again, ep.files)
        assert proxy.requests("PUT", PART_2) == 2
        assert complete(client, ep, opened["session"]).status_code == 200


def test_a_reset_connection_leaves_the_part_to_send_again(
    database_url: str, s3_server: EmbeddedS3Server, proxy: FaultProxy
) -> None:
    settings = receiver_settings(
        s3_server,
        database_url,
        public_s3_endpoint_url=proxy.url,
        multipart_threshold=5 * MIB,
        part_size=5 * MIB,
    )
    ep = episode(**{"b.mcap": 6 * MIB})
    with running_receiver(settings) as receiver, receiver.client() as client:
        opened = open_session(client, ep)
        upload(opened, ep.files, only=lambda name, part: part == 2)
        proxy.reset("PUT", r"[?&]partNumber=1(&|$)", after_bytes=MIB)
        with pytest.raises(httpx.TransportError):
            upload(opened, ep.files, only=lambda name, part: part == 1)
        assert proxy.requests("PUT", r"[?&]partNumber=1(&|$)") == 1
        again = open_session(client, ep)
        assert [p["done"] for p in by_name(again)["b.mcap"]["parts"]] == [False, True]
        upload(again, ep.files)
        assert complete(client, ep, opened["session"]).status_code == 200


def test_health_is_503_naming_the_store_when_it_goes_away(
    database_url: str, s3_server: EmbeddedS3Server, proxy: FaultProxy
) -> None:
    # The receiver's own S3 traffic goes through the proxy, so the test can cut it.
    settings = receiver_settings(s3_server, database_url, s3_endpoint_url=proxy.url)
    with running_receiver(settings) as receiver:
        assert httpx.get(f"{receiver.base_url}/health").status_code == 200
        proxy.down()
        down = httpx.get(f"{receiver.base_url}/health", timeout=10)
        proxy.up()
        up = httpx.get(f"{receiver.base_url}/health")
    assert down.status_code == 503
    body = down.json()
    assert body["code"] == "unavailable"
    assert body["components"] == {"database": "ok", "object_store": "failing"}
    assert "object_store" in body["message"]
    assert down.headers["retry-after"]
    assert up.status_code == 200


def test_the_bucket_is_created_at_start(
    database_url: str, s3_server: EmbeddedS3Server, tmp_path: Path
) -> None:
    bucket = f"receiver-{uuid.uuid4().hex[:10]}"
    settings = receiver_settings(s3_server, database_url, bucket=bucket)
    with running_receiver(settings) as receiver, receiver.client() as client:
        ep = episode(**{"a.json": 5})
        done = synced(client, ep)
        assert receiver.backends.store.bucket == bucket
        assert receiver.backends.store.size_of(ep.key("a.json")) == 5
    assert done["objects"][0]["key"] == ep.key("a.json")


def test_the_cli_command_serves_the_receiver(s3_server: EmbeddedS3Server, tmp_path: Path) -> None:
    (port,) = free_tcp_ports(1)
    token = new_token()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTONE_")}
    env.update(
        {
            "KEYSTONE_RECEIVER_DATABASE_URL": f"sqlite:///{tmp_path / 'cli' / 'receiver.db'}",
            "KEYSTONE_RECEIVER_S3_ENDPOINT_URL": s3_server.endpoint_url,
            "KEYSTONE_RECEIVER_S3_ACCESS_KEY": s3_server.access_key,
            "KEYSTONE_RECEIVER_S3_SECRET_KEY": s3_server.secret_key,
            "KEYSTONE_RECEIVER_TOKEN": token,
        }
    )
    log = (tmp_path / "receiver.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "keystone_cli", "cloud-receiver", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "receiver.log").read_text()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "keystone cloud-receiver did not start"
            time.sleep(0.1)
        headers = {"Authorization": f"Bearer {token}"}
        ep = episode(**{"a.json": 3})
        opened = httpx.post(f"{base}{EPISODE}", json=ep.manifest(), headers=headers)
        assert opened.status_code == 202
        assert httpx.post(f"{base}{EPISODE}", json=ep.manifest()).status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()
