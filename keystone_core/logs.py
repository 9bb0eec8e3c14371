"""Log lines: one JSON object per line (or one readable line), carrying the request id.

Every Keystone process logs through the formatters here. ``KEYSTONE_LOG_FORMAT=json``
(the default) writes ``{"ts", "level", "logger", "message", "request_id"?, "exc"?, …}``
with whatever the call passed as ``extra={…}``; ``text`` writes the same fields on one
readable line for a terminal (``keystone dev``).

The request id comes, in this order, from the record itself (``extra={"request_id": …}``),
from :func:`keystone_core.request_context.current_request_id` (the API request being
served) and from :func:`run_log_fields` (the request ids a Dagster run was tagged with).
The last one is deliberately not the request ContextVar: code inside a run that writes
audit rows or outbox events must not attribute them to a request that only caused some of
the run's work.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import logging.config
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from keystone_core.request_context import current_request_id

if TYPE_CHECKING:
    from keystone_core.settings import Settings

LogFormat = Literal["json", "text"]
# Loggers of Keystone's own code (``keystone.*`` by name, the rest by module).
KEYSTONE_LOGGERS = ("keystone", "keystone_core", "keystone_api", "keystone_pipelines")
# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_FIRST = ("ts", "level", "logger", "message", "request_id")

_run_fields: Mapping[str, str] = {}
# The active run_log_fields blocks, oldest first: blocks of concurrent threads (two runs
# executed in one process, as tests do) may end in any order, so each removes only its own.
_run_blocks: dict[int, Mapping[str, str]] = {}
_run_block_ids = itertools.count()
_run_fields_lock = threading.Lock()


def _merge_run_blocks() -> None:
    global _run_fields
    merged: dict[str, str] = {}
    for block in _run_blocks.values():
        merged.update(block)
    _run_fields = merged


@contextmanager
def run_log_fields(**fields: str | None) -> Iterator[None]:
    """Add ``fields`` (``None`` values dropped) to every record of this process while the
    block runs — threads started inside it included, which a ContextVar would miss.

    For a process that does one unit of work at a time: a Dagster run (Keystone's jobs
    use the in-process executor, one run per process). When blocks overlap, the newest
    block's values win, and each block's fields leave with it."""
    block = next(_run_block_ids)
    with _run_fields_lock:
        _run_blocks[block] = {k: v for k, v in fields.items() if v is not None}
        _merge_run_blocks()
    try:
        yield
    finally:
        with _run_fields_lock:
            _run_blocks.pop(block, None)
            _merge_run_blocks()


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What a line says about ``record``, in the order it is written."""
    out: dict[str, Any] = {
        "ts": dt.datetime.fromtimestamp(record.created, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "level": record.levelname,
        "logger": record.name,
        "message": record.getMessage(),
    }
    request_id = current_request_id()
    if request_id is not None:
        out["request_id"] = request_id
    for key, value in _run_fields.items():
        out.setdefault(key, value)
    for key, value in record.__dict__.items():
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_") and key not in _FIRST[:4]:
            out[key] = value
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line; values JSON cannot hold are written as ``str(value)``."""

    def format(self, record: logging.LogRecord) -> str:
        out = record_fields(record)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2026-11-23T08:00:00.000Z INFO keystone.api [req] message key=value …``."""

    def format(self, record: logging.LogRecord) -> str:
        out = record_fields(record)
        head = f"{out.pop('ts')} {out.pop('level'):<7} {out.pop('logger')}"
        # A path or device string with a line break must not start a forged line.
        message = str(out.pop("message")).replace("\r", "\\r").replace("\n", "\\n")
        request_id = out.pop("request_id", None)
        line = f"{head} [{request_id}] {message}" if request_id else f"{head} {message}"
        if out:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in out.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text


FORMATTERS: dict[str, type[logging.Formatter]] = {"json": JsonFormatter, "text": TextFormatter}


def logging_config(level: str, fmt: LogFormat, *, access_log: bool = False) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` document: every logger — uvicorn's included —
    writes through one handler on standard error with the chosen formatter.

    Passed to uvicorn as ``log_config`` so each worker process it starts applies it too.
    uvicorn's access log is dropped unless ``access_log``: the API's middleware writes
    one line per request itself, with the route template, duration and request id."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"keystone": {"()": f"{__name__}.{FORMATTERS[fmt].__name__}"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "keystone",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            # uvicorn's own handlers would print a second, unstructured copy.
            "uvicorn": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.access": {"level": level, "handlers": [], "propagate": access_log},
            # Undo configure_keystone_loggers should it have run in this process.
            **{
                name: {"level": level, "handlers": [], "propagate": True}
                for name in KEYSTONE_LOGGERS
            },
        },
    }


def configure_logging(settings: Settings) -> None:
    """Make this process log as ``KEYSTONE_LOG_LEVEL`` / ``KEYSTONE_LOG_FORMAT`` say."""
    logging.config.dictConfig(logging_config(settings.log_level, settings.log_format))


def configure_keystone_loggers(settings: Settings) -> None:
    """In a process whose logging belongs to another program (Dagster's run workers and
    code servers), give only Keystone's own loggers a handler with our formatter.

    They stop propagating, so a root handler the host program may add does not print a
    second copy; Dagster's ``python_logs.managed_python_loggers`` attaches to the named
    loggers themselves and keeps working."""
    formatter = FORMATTERS[settings.log_format]()
    for name in KEYSTONE_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(settings.log_level)
        # A second configuration replaces the first (its format, level and stream may
        # differ), so there is always exactly one of our handlers.
        for old in [h for h in logger.handlers if isinstance(h, _KeystoneHandler)]:
            logger.removeHandler(old)
        handler = _KeystoneHandler()
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        logger.propagate = False


class _KeystoneHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Standard error; a class of its own so a second configuration finds the first."""
