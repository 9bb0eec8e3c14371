"""Passwords (argon2), access tokens (JWT) and device/callback tokens (stored as hashes)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from keystone_core import clock
from keystone_core.errors import AuthenticationError
from keystone_core.models.enums import Role
from keystone_core.settings import Settings

DEVICE_TOKEN_PREFIX = "kws_v1_"  # noqa: S105 (a prefix, not a secret)
_hasher = PasswordHasher()
# Verifying against this keeps "unknown account" as slow as "wrong password".
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password: str, password_hash: str | None) -> bool:
    """True when ``password`` matches; constant work whether or not the account exists."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def password_needs_rehash(password_hash: str) -> bool:
    return _hasher.check_needs_rehash(password_hash)


@dataclass(frozen=True)
class AccessClaims:
    """What an access token says about its bearer."""

    sub: str
    role: Role
    factory_ids: tuple[int, ...]
    jti: str
    exp: int

    @property
    def all_factories(self) -> bool:
        return self.role is Role.ADMIN and not self.factory_ids


def issue_access_token(
    settings: Settings, *, subject: str, role: Role, factory_ids: list[int] | tuple[int, ...]
) -> tuple[str, int]:
    """Return ``(token, expires_in_seconds)``."""
    expires_in = settings.access_token_expire_minutes * 60
    issued = clock.now()
    payload: dict[str, Any] = {
        "sub": subject,
        "role": role.value,
        "factory_ids": [int(f) for f in factory_ids],
        "iat": int(issued.timestamp()),
        "exp": int((issued + timedelta(seconds=expires_in)).timestamp()),
        "jti": uuid.uuid4().hex,
    }
    token = jwt.encode(
        payload, settings.secret_key.get_secret_value(), algorithm=settings.jwt_algorithm
    )
    return token, expires_in


def decode_access_token(settings: Settings, token: str) -> AccessClaims:
    """Verify signature and expiry; raise AuthenticationError with a reason a client can act on."""
    try:
        payload = jwt.decode(
            token,
            settings.secret_key.get_secret_value(),
            algorithms=[settings.jwt_algorithm],
            # Expiry is checked below against Keystone's clock, which tests can move.
            options={
                "require": ["sub", "role", "exp", "jti"],
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except jwt.PyJWTError:
        raise AuthenticationError("access token is invalid", code="invalid_token") from None
    try:
        role = Role(payload["role"])
        factory_ids = tuple(int(f) for f in payload.get("factory_ids") or [])
        exp = int(payload["exp"])
    except (ValueError, TypeError):
        raise AuthenticationError("access token is invalid", code="invalid_token") from None
    if exp <= int(clock.now().timestamp()):
        raise AuthenticationError("access token expired", code="token_expired")
    return AccessClaims(
        sub=str(payload["sub"]),
        role=role,
        factory_ids=factory_ids,
        jti=str(payload["jti"]),
        exp=exp,
    )


def new_device_token() -> str:
    """A fresh device token: ``kws_v1_`` + 256 bits from ``secrets``; shown once."""
    return DEVICE_TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """SHA-256 hex of a high-entropy token (a slow hash adds nothing for 256-bit secrets)."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, token_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), token_hash)


CALLBACK_TOKEN_PREFIX = "kct_v1_"  # noqa: S105 (a prefix, not a secret)


def callback_token(settings: Settings, task_id: str) -> str:
    """The task config's ``user_token``: an HMAC of the task id under the secret key.

    It authorises the callbacks of that one task and nothing else. Derived rather than
    stored, the same token comes back every time the config is built (a re-sent config
    never invalidates the one the device already holds); only its SHA-256 is kept on the
    task row.
    """
    key = settings.secret_key.get_secret_value().encode()
    digest = hmac.new(key, b"axon-task-callback\x00" + task_id.encode(), hashlib.sha256)
    return CALLBACK_TOKEN_PREFIX + base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")


def callback_token_matches(settings: Settings, task_id: str, token: str) -> bool:
    return hmac.compare_digest(callback_token(settings, task_id).encode(), token.encode())
