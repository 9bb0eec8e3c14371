"""The error hierarchy of Keystone; the API maps each class to one HTTP status in one place."""

from __future__ import annotations

from typing import Any


class KeystoneError(Exception):
    """Base of every error Keystone raises on purpose; ``code`` is stable and machine-readable."""

    code = "keystone_error"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details


class ConfigurationError(KeystoneError):
    """A setting is missing or invalid; the message names the setting."""

    code = "configuration_error"


class NotFoundError(KeystoneError):
    """The row does not exist or is outside the caller's scope (never leak which)."""

    code = "not_found"


class ConflictError(KeystoneError):
    """The request conflicts with the current state (duplicate, wrong state, children exist)."""

    code = "conflict"


class TransitionConflict(ConflictError):
    """A state-machine transition was refused: the row was not in an allowed state."""

    code = "invalid_transition"


class AuthenticationError(KeystoneError):
    """Credentials are missing, wrong, expired or garbled."""

    code = "unauthorized"


class PermissionDeniedError(KeystoneError):
    """The caller is authenticated but its role may not do this."""

    code = "forbidden"


class ValidationFailed(KeystoneError):
    """Input is well-formed JSON but violates a rule the schema cannot express."""

    code = "validation_error"


class DependencyUnavailable(KeystoneError):
    """A backing service (database, object store) cannot be reached."""

    code = "dependency_unavailable"


class BadRequest(KeystoneError):
    """The request cannot be read at all (not JSON, not an object)."""

    code = "bad_request"


class PayloadTooLarge(KeystoneError):
    """The request body is larger than this route accepts."""

    code = "payload_too_large"


class DeviceTimeout(KeystoneError):
    """A device did not answer in time; whether it acted is unknown."""

    code = "recorder_timeout"
