"""Start a private SeaweedFS S3 server for a test session."""

from __future__ import annotations

import secrets
from pathlib import Path

from keystone_core.storage import EmbeddedS3Server


def start_test_s3_server(data_dir: Path) -> EmbeddedS3Server:
    """A started server on free ports with fresh random credentials."""
    server = EmbeddedS3Server(
        data_dir=data_dir,
        access_key="test" + secrets.token_hex(4),
        secret_key=secrets.token_urlsafe(24),
    )
    server.start()
    return server
