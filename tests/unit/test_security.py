"""Passwords (argon2), access tokens (JWT) and device tokens."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest

from keystone_core import clock
from keystone_core.errors import AuthenticationError
from keystone_core.models import Role
from keystone_core.security import (
    DEVICE_TOKEN_PREFIX,
    AccessClaims,
    decode_access_token,
    hash_password,
    hash_token,
    issue_access_token,
    new_device_token,
    password_needs_rehash,
    token_matches,
    verify_password,
)
from keystone_core.settings import Settings
from tests.conftest import make_settings

# In the past: PyJWT itself refuses tokens whose iat is ahead of the wall clock.
T0 = datetime(2024, 3, 1, 8, 0, 0, tzinfo=UTC)


def secret(settings: Settings) -> str:
    return settings.secret_key.get_secret_value()


def assert_refused(settings: Settings, token: str, code: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as refused:
        decode_access_token(settings, token)
    assert refused.value.code == code
    return refused.value


# --- passwords -------------------------------------------------------------------------------


def test_password_hash_verifies_only_the_right_password() -> None:
    stored = hash_password("correct horse battery staple")
    assert stored.startswith("$argon2")
    assert "correct horse" not in stored
    assert verify_password("correct horse battery staple", stored)
    assert not verify_password("correct horse battery stapler", stored)
    assert not verify_password("", stored)


def test_the_same_password_hashes_differently_each_time() -> None:
    first, second = hash_password("s3cret-pass"), hash_password("s3cret-pass")
    assert first != second
    assert verify_password("s3cret-pass", first)
    assert verify_password("s3cret-pass", second)


def test_verify_against_no_hash_is_false() -> None:
    assert verify_password("anything", None) is False
    assert verify_password("", None) is False


def test_verify_against_a_garbled_hash_is_false() -> None:
    assert verify_password("anything", "not-an-argon2-hash") is False
    assert verify_password("anything", "$argon2id$v=19$m=65536,t=3,p=4$garbage") is False


def test_fresh_hashes_need_no_rehash() -> None:
    assert not password_needs_rehash(hash_password("s3cret-pass"))


# --- access tokens ---------------------------------------------------------------------------


def test_access_token_round_trip(settings: Settings) -> None:
    with clock.frozen(T0):
        token, expires_in = issue_access_token(
            settings, subject="42", role=Role.PRODUCTION_MANAGER, factory_ids=[3, 1]
        )
        claims = decode_access_token(settings, token)
    assert expires_in == settings.access_token_expire_minutes * 60
    assert claims == AccessClaims(
        sub="42",
        role=Role.PRODUCTION_MANAGER,
        factory_ids=(3, 1),
        jti=claims.jti,
        exp=int(T0.timestamp()) + expires_in,
    )
    assert re.fullmatch(r"[0-9a-f]{32}", claims.jti)
    assert not claims.all_factories


def test_access_token_carries_the_documented_claims(settings: Settings) -> None:
    with clock.frozen(T0):
        token, _ = issue_access_token(settings, subject="7", role=Role.ADMIN, factory_ids=[])
    header = jwt.get_unverified_header(token)
    payload = jwt.decode(token, options={"verify_signature": False})
    assert header["alg"] == "HS256"
    assert set(payload) >= {"sub", "role", "factory_ids", "exp", "jti"}
    assert payload["sub"] == "7"
    assert payload["role"] == "admin"
    assert payload["factory_ids"] == []


def test_every_token_has_its_own_jti(settings: Settings) -> None:
    with clock.frozen(T0):
        tokens = [
            issue_access_token(settings, subject="1", role=Role.ADMIN, factory_ids=[])[0]
            for _ in range(5)
        ]
        jtis = {decode_access_token(settings, t).jti for t in tokens}
    assert len(jtis) == 5


def test_admin_without_factories_sees_all_but_scoped_roles_never_do(settings: Settings) -> None:
    with clock.frozen(T0):
        admin, _ = issue_access_token(settings, subject="1", role=Role.ADMIN, factory_ids=[])
        scoped, _ = issue_access_token(settings, subject="1", role=Role.ADMIN, factory_ids=[2])
        other, _ = issue_access_token(
            settings, subject="2", role=Role.DATA_INSPECTOR, factory_ids=[]
        )
        assert decode_access_token(settings, admin).all_factories
        assert not decode_access_token(settings, scoped).all_factories
        assert not decode_access_token(settings, other).all_factories


def test_token_is_valid_until_it_expires(settings: Settings) -> None:
    lifetime = timedelta(minutes=settings.access_token_expire_minutes)
    with clock.frozen(T0) as move:
        token, _ = issue_access_token(settings, subject="1", role=Role.ADMIN, factory_ids=[])
        move(T0 + lifetime - timedelta(seconds=1))
        assert decode_access_token(settings, token).sub == "1"
        move(T0 + lifetime)
        error = assert_refused(settings, token, "token_expired")
        move(T0 + lifetime + timedelta(days=1))
        assert_refused(settings, token, "token_expired")
    assert error.message == "access token expired"


def test_a_garbled_token_is_invalid(settings: Settings) -> None:
    for garbage in ["", "not-a-jwt", "a.b.c", "x" * 500]:
        error = assert_refused(settings, garbage, "invalid_token")
        assert error.message == "access token is invalid"


def test_a_token_with_a_flipped_signature_is_invalid(settings: Settings) -> None:
    with clock.frozen(T0):
        token, _ = issue_access_token(settings, subject="1", role=Role.ADMIN, factory_ids=[])
        head, body, signature = token.split(".")
        flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
        assert_refused(settings, f"{head}.{body}.{flipped}", "invalid_token")


def test_a_token_signed_with_another_key_is_invalid(settings: Settings, tmp_path: Path) -> None:
    other = make_settings(tmp_path, secret_key="another-secret-key-of-enough-length-0123456789")
    with clock.frozen(T0):
        token, _ = issue_access_token(other, subject="1", role=Role.ADMIN, factory_ids=[])
        assert decode_access_token(other, token).sub == "1"
        assert_refused(settings, token, "invalid_token")


def test_an_unsigned_alg_none_token_is_invalid(settings: Settings) -> None:
    payload = {
        "sub": "1",
        "role": "admin",
        "factory_ids": [],
        "exp": int(T0.timestamp()) + 3600,
        "jti": "a" * 32,
    }
    token = jwt.encode(payload, key=None, algorithm="none")
    with clock.frozen(T0):
        assert_refused(settings, token, "invalid_token")


@pytest.mark.filterwarnings("ignore:The HMAC key is")
def test_a_token_with_another_hmac_algorithm_is_invalid(settings: Settings) -> None:
    payload = {"sub": "1", "role": "admin", "exp": int(T0.timestamp()) + 3600, "jti": "j"}
    token = jwt.encode(payload, secret(settings), algorithm="HS512")
    with clock.frozen(T0):
        assert_refused(settings, token, "invalid_token")


def test_a_hand_edited_payload_is_invalid(settings: Settings) -> None:
    with clock.frozen(T0):
        token, _ = issue_access_token(
            settings, subject="5", role=Role.DATA_COLLECTOR, factory_ids=[1]
        )
        head, body, signature = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        claims["role"] = "admin"
        forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        assert_refused(settings, f"{head}.{forged}.{signature}", "invalid_token")


@pytest.mark.parametrize(
    "payload",
    [
        {"role": "admin", "exp": 1, "jti": "j"},  # no sub
        {"sub": "1", "exp": 1, "jti": "j"},  # no role
        {"sub": "1", "role": "admin", "jti": "j"},  # no exp
        {"sub": "1", "role": "admin", "exp": 1},  # no jti
        {"sub": "1", "role": "superuser", "exp": 1, "jti": "j"},  # unknown role
        {"sub": "1", "role": "admin", "exp": 1, "jti": "j", "factory_ids": ["x"]},
    ],
    ids=["no-sub", "no-role", "no-exp", "no-jti", "unknown-role", "bad-factory-ids"],
)
def test_a_signed_token_with_bad_claims_is_invalid(
    settings: Settings, payload: dict[str, object]
) -> None:
    if "exp" in payload:
        payload["exp"] = int(T0.timestamp()) + 3600
    token = jwt.encode(payload, secret(settings), algorithm="HS256")
    with clock.frozen(T0):
        assert_refused(settings, token, "invalid_token")


def test_a_token_from_a_replica_whose_clock_runs_ahead_is_accepted(settings: Settings) -> None:
    with clock.frozen(clock.now() + timedelta(seconds=30)):
        token, _ = issue_access_token(settings, subject="1", role=Role.ADMIN, factory_ids=[])
    assert decode_access_token(settings, token).sub == "1"


# --- device tokens ---------------------------------------------------------------------------


def test_device_tokens_are_prefixed_random_and_long() -> None:
    assert DEVICE_TOKEN_PREFIX == "kws_v1_"
    tokens = {new_device_token() for _ in range(20)}
    assert len(tokens) == 20
    for token in tokens:
        assert len(token) >= len("kws_v1_") + 43  # 256 bits, url-safe base64
        assert re.fullmatch(r"kws_v1_[A-Za-z0-9_-]+", token)


def test_hash_token_is_sha256_hex_and_matches_only_its_token() -> None:
    token = new_device_token()
    stored = hash_token(token)
    assert re.fullmatch(r"[0-9a-f]{64}", stored)
    assert token not in stored
    assert hash_token(token) == stored
    assert token_matches(token, stored)
    assert not token_matches(token + "x", stored)
    assert not token_matches(new_device_token(), stored)
    assert not token_matches(token, "")
