"""Signing webhook bodies (Keystone) and verifying them (receivers): HMAC-SHA256 with a timestamp.

The ``X-Keystone-Signature`` header is ``t=<unix seconds>,v1=<hex>`` where ``<hex>`` is
``HMAC-SHA256(secret, f"{t}.".encode() + raw_body)``. Signing the timestamp with the body
lets a receiver refuse replays of an old delivery (:data:`DEFAULT_TOLERANCE_S`); the raw
body is signed, so a receiver must verify the bytes it received, before parsing them.
This module has no dependency beyond the standard library, so a receiver can copy it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

SIGNATURE_HEADER = "X-Keystone-Signature"
EVENT_HEADER = "X-Keystone-Event"
DELIVERY_HEADER = "X-Keystone-Delivery"
REQUEST_ID_HEADER = "X-Request-ID"
SCHEME = "v1"
DEFAULT_TOLERANCE_S = 300
MAX_HEADER_LENGTH = 4096

_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class SignatureError(ValueError):
    """The signature header is missing, malformed, stale, or does not match the body."""


def compute_signature(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``f"{timestamp}."`` + ``body`` under ``secret``."""
    message = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, *, timestamp: int) -> str:
    """The value of ``X-Keystone-Signature`` for ``body`` sent at ``timestamp``."""
    return f"t={timestamp},{SCHEME}={compute_signature(secret, timestamp, body)}"


def parse_signature_header(header: str | None) -> tuple[int, list[str]]:
    """``(timestamp, [v1 signatures])`` of a header; :class:`SignatureError` if malformed."""
    if not header or not header.strip():
        raise SignatureError(f"missing {SIGNATURE_HEADER} header")
    if len(header) > MAX_HEADER_LENGTH:
        raise SignatureError(f"{SIGNATURE_HEADER} header is too long")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureError(f"malformed {SIGNATURE_HEADER} element {part.strip()!r}")
        if key == "t":
            if timestamp is not None or not value.isascii() or not value.isdigit():
                raise SignatureError(f"malformed timestamp in {SIGNATURE_HEADER}")
            timestamp = int(value)
        elif key == SCHEME:
            if not _HEX_DIGEST.match(value):
                raise SignatureError(f"malformed {SCHEME} signature in {SIGNATURE_HEADER}")
            signatures.append(value)
        # Other schemes are ignored: a later version may send several side by side.
    if timestamp is None:
        raise SignatureError(f"no timestamp (t=) in {SIGNATURE_HEADER}")
    if not signatures:
        raise SignatureError(f"no {SCHEME} signature in {SIGNATURE_HEADER}")
    return timestamp, signatures


def verify_signature(
    secret: str,
    header: str | None,
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> int:
    """Check a delivery's ``X-Keystone-Signature`` against its raw ``body``.

    Returns the signed timestamp. Raises :class:`SignatureError` when the header is
    missing or malformed, the timestamp is more than ``tolerance_s`` away from ``now``
    (unix seconds; the current time by default) in either direction, or no signature
    matches (constant-time comparison).
    """
    timestamp, signatures = parse_signature_header(header)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise SignatureError(
            f"signature timestamp {timestamp} is outside the {tolerance_s:g} s tolerance"
        )
    expected = compute_signature(secret, timestamp, body)
    # Compare against every candidate so the time taken does not depend on which matched.
    matched = False
    for candidate in signatures:
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError("signature does not match the body")
    return timestamp
