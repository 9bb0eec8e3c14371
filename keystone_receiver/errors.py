"""The receiver's errors: each carries its HTTP status, stable code and extra body fields."""

from __future__ import annotations

from typing import Any, ClassVar


class ReceiverError(Exception):
    """An answer other than success; ``app.py`` turns it into ``{code, message, **extra}``."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class Unauthorized(ReceiverError):
    status = 401
    code = "unauthorized"


class UnknownEpisode(ReceiverError):
    status = 404
    code = "unknown_episode"


class AlreadySynced(ReceiverError):
    """The episode is complete; a sender treats this as success (it has ``synced_at``)."""

    status = 409
    code = "already_synced"


class SessionMismatch(ReceiverError):
    """``complete`` named a session that is no longer the episode's current one."""

    status = 409
    code = "session_mismatch"


class InvalidRequest(ReceiverError):
    status = 422
    code = "invalid_request"


class ObjectMismatch(ReceiverError):
    """Objects are missing or differ from the manifest; they must be uploaded again."""

    status = 422
    code = "object_mismatch"


class ObjectStoreUnavailable(ReceiverError):
    status = 503
    code = "object_store_unavailable"


class DatabaseUnavailable(ReceiverError):
    status = 503
    code = "database_unavailable"
