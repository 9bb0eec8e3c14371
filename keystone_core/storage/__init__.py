"""Object storage: the one S3 client factory, bucket helpers and the embedded S3 server."""

from keystone_core.storage.client import check_object_store, create_s3_client, ensure_bucket
from keystone_core.storage.embedded import EmbeddedS3Error, EmbeddedS3Server

__all__ = [
    "EmbeddedS3Error",
    "EmbeddedS3Server",
    "check_object_store",
    "create_s3_client",
    "ensure_bucket",
]
