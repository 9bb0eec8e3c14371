"""Webhook signatures: ``t=<unix>,v1=<hex HMAC-SHA256(secret, "t." + body)>``, verified by
receivers with a timestamp tolerance; every malformed header is refused with a reason."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keystone_core.webhooks.signing import (
    SignatureError,
    compute_signature,
    parse_signature_header,
    signature_header,
    verify_signature,
)

SECRET = "whsec_test-secret"
BODY = b'{"id":"1","type":"episode.approved","data":{"episode_id":"e-1"}}'
T = 1_800_000_000


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    header = signature_header(SECRET, BODY, timestamp=T)
    expected = hmac.new(SECRET.encode(), f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert header == f"t={T},v1={expected}"
    assert compute_signature(SECRET, T, BODY) == expected


def test_a_correct_signature_verifies_and_returns_its_timestamp() -> None:
    header = signature_header(SECRET, BODY, timestamp=T)
    assert verify_signature(SECRET, header, BODY, now=T + 10) == T


@pytest.mark.parametrize(
    ("secret", "body"),
    [
        ("whsec_another-secret", BODY),
        (SECRET, BODY + b" "),
        (SECRET, BODY.replace(b"e-1", b"e-2")),
        (SECRET, b""),
    ],
    ids=["wrong secret", "trailing byte", "changed body", "empty body"],
)
def test_another_secret_or_body_does_not_verify(secret: str, body: bytes) -> None:
    header = signature_header(SECRET, BODY, timestamp=T)
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature(secret, header, body, now=T)


@pytest.mark.parametrize("offset", [301, -301, 3600, -86400])
def test_a_timestamp_outside_the_tolerance_is_refused(offset: int) -> None:
    header = signature_header(SECRET, BODY, timestamp=T)
    with pytest.raises(SignatureError, match="tolerance"):
        verify_signature(SECRET, header, BODY, now=T + offset)


@pytest.mark.parametrize("offset", [0, 300, -300, 299.5])
def test_a_timestamp_inside_the_tolerance_is_accepted(offset: float) -> None:
    header = signature_header(SECRET, BODY, timestamp=T)
    assert verify_signature(SECRET, header, BODY, now=T + offset) == T


def test_the_tolerance_can_be_narrowed() -> None:
    header = signature_header(SECRET, BODY, timestamp=T)
    with pytest.raises(SignatureError, match="tolerance"):
        verify_signature(SECRET, header, BODY, tolerance_s=5, now=T + 6)
    assert verify_signature(SECRET, header, BODY, tolerance_s=5, now=T + 5) == T


def test_a_replayed_old_delivery_is_refused_even_with_the_right_secret() -> None:
    header = signature_header(SECRET, BODY, timestamp=T - 3600)
    with pytest.raises(SignatureError):
        verify_signature(SECRET, header, BODY, now=T)


GOOD = compute_signature(SECRET, T, BODY)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("   ", "missing"),
        (f"v1={GOOD}", "no timestamp"),
        (f"t={T}", "no v1"),
        (f"t={T},v0={GOOD}", "no v1"),
        (f"t=abc,v1={GOOD}", "malformed timestamp"),
        (f"t=-5,v1={GOOD}", "malformed timestamp"),
        (f"t=,v1={GOOD}", "malformed timestamp"),
        (f"t=١٢٣,v1={GOOD}", "malformed timestamp"),  # non-ASCII digits
        (f"t={T},t={T},v1={GOOD}", "malformed timestamp"),
        (f"t={T},v1={GOOD[:-1]}", "malformed v1"),
        (f"t={T},v1={GOOD.upper()}", "malformed v1"),
        (f"t={T},v1=zz{GOOD[2:]}", "malformed v1"),
        (f"t={T};v1={GOOD}", "malformed"),
        (f"t={T},garbage", "malformed"),
        ("t=1," + "v1=" + "a" * 5000, "too long"),
    ],
)
def test_malformed_headers_are_refused_with_a_reason(header: str | None, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        verify_signature(SECRET, header, BODY, now=T)


def test_any_of_several_v1_signatures_may_match_and_other_schemes_are_ignored() -> None:
    other = compute_signature("whsec_old", T, BODY)
    header = f"t={T},v1={other},v2=whatever,v1={GOOD}"
    assert parse_signature_header(header) == (T, [other, GOOD])
    assert verify_signature(SECRET, header, BODY, now=T) == T


def test_verification_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    other = compute_signature("whsec_old", T, BODY)
    verify_signature(SECRET, f"t={T},v1={GOOD},v1={other}", BODY, now=T)
    # Every candidate is compared, also after the first matched.
    assert compared == [(GOOD, GOOD), (GOOD, other)]


@given(secret=st.text(min_size=1, max_size=64), body=st.binary(max_size=2048))
def test_round_trip_for_any_secret_and_body(secret: str, body: bytes) -> None:
    header = signature_header(secret, body, timestamp=T)
    assert verify_signature(secret, header, body, now=T) == T
    with pytest.raises(SignatureError):
        verify_signature(secret + "x", header, body, now=T)
