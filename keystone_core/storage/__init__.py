"""Object storage: the one S3 client factory, bucket helpers and the embedded S3 server.

Everything that talks S3 gets its client from :func:`create_s3_client` (or, before any
settings exist, :func:`create_s3_client_for_endpoint`), so timeouts, retries and addressing
are the same for the API, Dagster and the CLI.
"""

from keystone_core.storage.client import (
    check_object_store,
    create_presign_client,
    create_s3_client,
    create_s3_client_for_endpoint,
    ensure_bucket,
)
from keystone_core.storage.embedded import (
    EmbeddedS3Error,
    EmbeddedS3Server,
    WeedPorts,
    free_tcp_ports,
)

__all__ = [
    "EmbeddedS3Error",
    "EmbeddedS3Server",
    "WeedPorts",
    "check_object_store",
    "create_presign_client",
    "create_s3_client",
    "create_s3_client_for_endpoint",
    "ensure_bucket",
    "free_tcp_ports",
]
