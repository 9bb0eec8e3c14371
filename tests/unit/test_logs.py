"""Log lines: the JSON and text formats, the request id from the request, from the run and
from the record, uvicorn going through the same handler, the access line the middleware
writes once per request, and X-Request-ID values that are not safe to log."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import job, op
from fastapi.testclient import TestClient

from keystone_api.app import create_app
from keystone_api.middleware import request_id_from
from keystone_core.logs import (
    KEYSTONE_LOGGERS,
    JsonFormatter,
    TextFormatter,
    configure_keystone_loggers,
    logging_config,
    record_fields,
    run_log_fields,
)
from keystone_core.request_context import bound_request_id
from keystone_core.settings import Settings, load_settings
from keystone_pipelines.defs.runs import REQUEST_ID_TAG, run_logging
from tests.conftest import make_settings

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Tests here reconfigure process-wide logging; put it back as it was."""
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.access", *KEYSTONE_LOGGERS]
    saved = {
        name: (lg.level, list(lg.handlers), lg.propagate)
        for name in names
        for lg in [logging.getLogger(name)]
    }
    yield
    for name, (level, handlers, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate


def capture(logger: str, formatter: logging.Formatter | None = None) -> io.StringIO:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter or JsonFormatter())
    target = logging.getLogger(logger)
    target.addHandler(handler)
    target.setLevel(logging.DEBUG)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


# --- the formats ----------------------------------------------------------------------


def test_json_lines_carry_time_level_logger_message_and_extra_fields() -> None:
    stream = capture("keystone.test.json")
    logging.getLogger("keystone.test.json").info(
        "pushed %d episode(s)", 3, extra={"factory": "f1", "ids": [1, 2], "when": Path("/x")}
    )
    (line,) = lines(stream)
    assert list(line)[:4] == ["ts", "level", "logger", "message"]
    assert ISO_UTC.match(str(line["ts"]))
    assert line["level"] == "INFO"
    assert line["logger"] == "keystone.test.json"
    assert line["message"] == "pushed 3 episode(s)"
    assert line["factory"] == "f1"
    assert line["ids"] == [1, 2]
    assert line["when"] == "/x"  # not JSON: written as str()
    assert "request_id" not in line  # outside a request


def test_an_exception_is_in_the_same_line_and_the_line_stays_one_line() -> None:
    stream = capture("keystone.test.exc")
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logging.getLogger("keystone.test.exc").exception("it failed")
    raw = stream.getvalue()
    assert raw.count("\n") == 1
    (line,) = lines(stream)
    assert line["level"] == "ERROR"
    assert "ValueError: bad" in str(line["exc"])
    assert "Traceback" in str(line["exc"])


def test_the_request_id_comes_from_the_request_being_served() -> None:
    stream = capture("keystone.test.rid")
    log = logging.getLogger("keystone.test.rid")
    with bound_request_id("req-abc"):
        log.warning("inside")
    log.warning("outside")
    inside, outside = lines(stream)
    assert inside["request_id"] == "req-abc"
    assert "request_id" not in outside


def test_run_fields_reach_threads_and_the_record_and_request_win() -> None:
    stream = capture("keystone.test.run")
    log = logging.getLogger("keystone.test.run")
    with run_log_fields(run_id="run-1", request_id="req-a,req-b", empty=None):
        worker = threading.Thread(target=lambda: log.info("from a worker thread"))
        worker.start()
        worker.join()
        with bound_request_id("req-live"):
            log.info("a request inside")
        log.info("explicit", extra={"request_id": "req-x"})
    log.info("after")
    thread, request, explicit, after = lines(stream)
    assert thread["run_id"] == "run-1"
    assert thread["request_id"] == "req-a,req-b"
    assert "empty" not in thread
    assert request["request_id"] == "req-live"
    assert explicit["request_id"] == "req-x"
    assert "run_id" not in after
    assert "request_id" not in after


def test_text_lines_are_readable_and_a_line_break_cannot_forge_a_line() -> None:
    stream = capture("keystone.test.text", TextFormatter())
    log = logging.getLogger("keystone.test.text")
    with bound_request_id("req-t"):
        log.info("GET %s", "/a\nINFO forged", extra={"status": 200, "who": "two words"})
    raw = stream.getvalue()
    assert raw.count("\n") == 1
    assert re.match(
        r"^\S+Z INFO    keystone\.test\.text \[req-t\] GET /a\\nINFO forged "
        r'status=200 who="two words"$',
        raw.strip(),
    ), raw


# --- process configuration ------------------------------------------------------------


def test_logging_config_sends_uvicorn_and_ours_through_one_handler(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logging.config.dictConfig(logging_config("INFO", "json"))
    logging.getLogger("uvicorn.error").info("Started server process")
    logging.getLogger("uvicorn.access").info('127.0.0.1 - "GET / HTTP/1.1" 200')
    logging.getLogger("keystone.api").debug("below the level")
    logging.getLogger("keystone_core.services.sync").warning("from the core")
    written = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(w["logger"], w["message"]) for w in written] == [
        ("uvicorn.error", "Started server process"),
        ("keystone_core.services.sync", "from the core"),
    ]  # uvicorn's access line is not written: the middleware writes its own


def test_logging_config_keeps_uvicorns_access_log_when_asked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logging.config.dictConfig(logging_config("INFO", "text", access_log=True))
    logging.getLogger("uvicorn.access").info('127.0.0.1 - "GET / HTTP/1.1" 200')
    assert 'uvicorn.access 127.0.0.1 - "GET / HTTP/1.1" 200' in capsys.readouterr().err


def test_keystone_loggers_in_a_foreign_process_get_one_handler_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, log_format="text", log_level="WARNING")
    configure_keystone_loggers(settings)
    configure_keystone_loggers(settings)  # a second call adds nothing
    for name in KEYSTONE_LOGGERS:
        assert len(logging.getLogger(name).handlers) == 1
        assert logging.getLogger(name).propagate is False
    logging.getLogger("keystone_core.x").warning("once")
    logging.getLogger("keystone_core.x").info("filtered")
    err = capsys.readouterr().err
    assert err.count("once") == 1
    assert "filtered" not in err
    # The API's configuration takes the loggers back into the root handler.
    logging.config.dictConfig(logging_config("INFO", "json"))
    assert all(logging.getLogger(n).propagate for n in KEYSTONE_LOGGERS)
    assert not any(logging.getLogger(n).handlers for n in KEYSTONE_LOGGERS)


def test_a_later_configuration_replaces_an_earlier_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A run process configures Keystone's loggers at every op start; the latest settings
    # (format, level, the current standard error) must win.
    configure_keystone_loggers(make_settings(tmp_path, log_format="json", log_level="INFO"))
    configure_keystone_loggers(make_settings(tmp_path, log_format="text", log_level="WARNING"))
    for name in KEYSTONE_LOGGERS:
        assert len(logging.getLogger(name).handlers) == 1
    logging.getLogger("keystone_core.y").warning("latest wins")
    logging.getLogger("keystone_core.y").info("below the level")
    err = capsys.readouterr().err
    assert "latest wins" in err
    assert not err.lstrip().startswith("{")  # text, not JSON
    assert "below the level" not in err
    logging.config.dictConfig(logging_config("INFO", "json"))


def test_overlapping_run_blocks_leave_no_fields_behind_whatever_order_they_end_in() -> None:
    # Two runs executed in one process (threads, as the tests do) end in any order: each
    # block's fields leave with it, and none outlives both.
    record = logging.LogRecord("keystone.t", logging.INFO, __file__, 1, "m", None, None)
    first = run_log_fields(run_id="run-a", request_id="req-a")
    second = run_log_fields(run_id="run-b")
    first.__enter__()
    second.__enter__()
    assert record_fields(record)["run_id"] == "run-b"  # the newest block wins
    first.__exit__(None, None, None)  # the older block ends first
    fields = record_fields(record)
    assert fields["run_id"] == "run-b"
    assert "request_id" not in fields
    second.__exit__(None, None, None)
    assert "run_id" not in record_fields(record)


def test_log_format_is_a_setting_with_two_values() -> None:
    assert load_settings().log_format == "json"
    assert load_settings(log_format="text").log_format == "text"
    with pytest.raises(Exception, match="KEYSTONE_LOG_FORMAT"):
        load_settings(log_format="xml")


# --- inside a Dagster run ---------------------------------------------------------------


def test_keystone_log_lines_inside_a_run_name_the_run_and_its_request(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    seen: list[dict[str, object]] = []

    @op
    def log_from_threads(context) -> None:  # type: ignore[no-untyped-def]  # Dagster reads it
        with run_logging(context, settings):
            stream = io.StringIO()
            for name in KEYSTONE_LOGGERS:  # this test's stand-in for the run's stderr
                for handler in logging.getLogger(name).handlers:
                    assert isinstance(handler, logging.StreamHandler)
                    handler.setStream(stream)
            worker = threading.Thread(
                target=lambda: logging.getLogger("keystone_core.services.qa").warning("scored")
            )
            worker.start()
            worker.join()
            seen.extend(json.loads(line) for line in stream.getvalue().splitlines())

    @job
    def logging_job() -> None:
        log_from_threads()

    result = logging_job.execute_in_process(tags={REQUEST_ID_TAG: "req-abc,req-def"})
    assert result.success
    (line,) = seen
    assert line["message"] == "scored"
    assert line["run_id"] == result.run_id
    assert line["request_id"] == "req-abc,req-def"


# --- X-Request-ID and the access line ---------------------------------------------------


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        (b"req-abc", True),
        (b"2026-11-23T08:00:00Z.host_1", True),
        (b"a" * 64, True),
        (b"a" * 65, False),
        (b"", False),
        (b"two words", False),
        (b'quote"d', False),
        (b"line\nbreak", False),
        (b"caf\xe9", False),
        (b"{json}", False),
    ],
)
def test_only_safe_request_ids_are_kept(given: bytes, kept: bool) -> None:
    made = request_id_from({b"x-request-id": given} if given else {})
    if kept:
        assert made == given.decode()
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", made)


@pytest.fixture
def api_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def client(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings)) as c:
        yield c


def test_an_unsafe_request_id_is_replaced_in_the_response(client: TestClient) -> None:
    for unsafe in ("x" * 65, "two words", 'a"b', "<script>"):
        answer = client.get("/api/v1/health/live", headers={"X-Request-ID": unsafe})
        assert answer.status_code == 200
        assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"]), unsafe
    kept = client.get("/api/v1/health/live", headers={"X-Request-ID": "req:1.2_3-4"})
    assert kept.headers["x-request-id"] == "req:1.2_3-4"


def test_one_access_line_per_request_with_route_status_duration_and_request_id(
    client: TestClient,
) -> None:
    stream = capture("keystone")
    answer = client.get("/api/v1/episodes/12345", headers={"X-Request-ID": "req-access-1"})
    assert answer.status_code == 401
    access = [line for line in lines(stream) if line["logger"] == "keystone.access"]
    assert len(access) == 1
    (line,) = access
    assert line["request_id"] == "req-access-1"
    assert line["method"] == "GET"
    assert line["route"] == "/api/v1/episodes/{id}"
    assert line["path"] == "/api/v1/episodes/12345"
    assert line["status"] == 401
    assert isinstance(line["duration_ms"], float)
    assert line["message"].startswith("GET /api/v1/episodes/12345 401 ")  # type: ignore[union-attr]


def test_code_run_for_a_request_logs_with_its_request_id(client: TestClient) -> None:
    stream = capture("keystone")
    answer = client.post(
        "/api/v1/callbacks/start",
        content=b"not json",
        headers={"X-Request-ID": "req-cb-1", "Content-Type": "application/json"},
    )
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid_json"
    by_logger = {str(line["logger"]): line for line in lines(stream)}
    assert "is not JSON" in str(by_logger["keystone.callbacks"]["message"])
    assert by_logger["keystone.callbacks"]["request_id"] == "req-cb-1"
    assert by_logger["keystone.access"]["request_id"] == "req-cb-1"
