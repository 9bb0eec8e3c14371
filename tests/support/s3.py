"""Start private SeaweedFS S3 servers for tests and point settings at them."""

from __future__ import annotations

import secrets
from pathlib import Path

from keystone_core.storage import EmbeddedS3Server

# A cold `weed mini` is ready in ~1.5 s; the margin is for loaded CI machines.
TEST_START_TIMEOUT_S = 60.0


def start_test_s3_server(tmp_dir: Path) -> EmbeddedS3Server:
    """A started server under ``tmp_dir`` on free ports with fresh random credentials.

    Random keys per server prove that code under test uses the configured credentials rather
    than whatever a developer's environment happens to hold. The caller stops it.
    """
    server = EmbeddedS3Server(
        data_dir=tmp_dir,
        access_key="TEST" + secrets.token_hex(8).upper(),
        secret_key=secrets.token_urlsafe(30),
        # A session makes a bucket per test factory; weed's default (one volume per GiB of
        # free disk) ran out after ~56 buckets on a CI host.
        max_volumes=2000,
    )
    server.start(timeout=TEST_START_TIMEOUT_S)
    return server


def s3_settings_overrides(server: EmbeddedS3Server) -> dict[str, object]:
    """Settings values that point Keystone at ``server`` (for ``load_settings(**...)``)."""
    return {
        "s3_endpoint_url": server.endpoint_url,
        "s3_access_key": server.access_key,
        "s3_secret_key": server.secret_key,
    }
