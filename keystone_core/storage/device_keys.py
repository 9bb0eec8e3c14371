"""Object-store keys for devices, limited to the device's own ``{factory_id}/{device_id}/``.

Issued through the standard AWS IAM API (CreateUser, CreateAccessKey, PutUserPolicy) at
the object store's endpoint: AWS itself and SeaweedFS (``-s3.iam.readOnly=false``) speak
it. A device key may put, get and list under its prefix and nothing else; deleting the
user revokes it at once. Stores without that API run with
``KEYSTONE_DEVICE_S3_CREDENTIALS=shared`` (Keystone's own key, not prefix-scoped) or
``none`` (keys configured on the device by hand); docs/devices.md explains the trade-off.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from keystone_core.errors import DependencyUnavailable
from keystone_core.storage.client import DEFAULT_REGION, _client_config

if TYPE_CHECKING:
    from keystone_core.settings import Settings

log = logging.getLogger(__name__)

POLICY_NAME = "keystone-device-prefix"


@dataclass(frozen=True)
class DeviceKey:
    user_name: str
    access_key: str
    secret_key: str


def device_prefix(factory_id: int, device_id: str) -> str:
    return f"{factory_id}/{device_id}/"


def user_name_for(device_id: str) -> str:
    return f"keystone-device-{device_id}"


def prefix_policy(bucket: str, prefix: str) -> dict[str, Any]:
    """Put/get/multipart under ``prefix`` and list it; nothing else (no delete)."""
    base = prefix.rstrip("/")
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload"],
                "Resource": [f"arn:aws:s3:::{bucket}/{base}/*"],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{bucket}"],
                "Condition": {"StringLike": {"s3:prefix": [f"{base}/*"]}},
            },
        ],
    }


def _iam(settings: Settings) -> Any:
    return boto3.client(
        "iam",
        endpoint_url=settings.s3_endpoint_url or None,
        region_name=settings.s3_region or DEFAULT_REGION,
        aws_access_key_id=(
            settings.s3_access_key.get_secret_value() if settings.s3_access_key else None
        ),
        aws_secret_access_key=(
            settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None
        ),
        config=_client_config(health=False),
    )


def issue_device_key(settings: Settings, bucket: str, prefix: str, device_id: str) -> DeviceKey:
    """A new IAM user with one access key and the prefix policy."""
    iam = _iam(settings)
    user = user_name_for(device_id)
    try:
        iam.create_user(UserName=user)
        try:
            key = iam.create_access_key(UserName=user)["AccessKey"]
            iam.put_user_policy(
                UserName=user,
                PolicyName=POLICY_NAME,
                PolicyDocument=json.dumps(prefix_policy(bucket, prefix)),
            )
        except (BotoCoreError, ClientError):
            _delete_user(iam, user)
            raise
    except (BotoCoreError, ClientError) as exc:
        raise DependencyUnavailable(
            f"the object store did not issue a device key ({exc}); it needs the IAM API, "
            "or set KEYSTONE_DEVICE_S3_CREDENTIALS=shared|none",
            code="object_store_credentials_unavailable",
        ) from None
    return DeviceKey(
        user_name=user, access_key=str(key["AccessKeyId"]), secret_key=str(key["SecretAccessKey"])
    )


def revoke_device_key(settings: Settings, device_id: str) -> bool:
    """Delete the device's IAM user and keys; False when the store could not be reached."""
    try:
        _delete_user(_iam(settings), user_name_for(device_id))
    except (BotoCoreError, ClientError) as exc:
        log.error("revoking the object-store key of %s failed: %s", device_id, exc)
        return False
    return True


def _delete_user(iam: Any, user: str) -> None:
    """Keys and inline policy first (AWS refuses otherwise), then the user; gone is fine."""
    try:
        keys = iam.list_access_keys(UserName=user).get("AccessKeyMetadata", [])
    except ClientError as exc:
        if _missing(exc):
            return
        raise
    for key in keys:
        _ignore_missing(
            lambda k=key: iam.delete_access_key(UserName=user, AccessKeyId=k["AccessKeyId"])
        )
    _ignore_missing(lambda: iam.delete_user_policy(UserName=user, PolicyName=POLICY_NAME))
    _ignore_missing(lambda: iam.delete_user(UserName=user))


def _missing(exc: ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in {"NoSuchEntity", "NoSuchEntityException", "404"}


def _ignore_missing(call: Any) -> None:
    try:
        call()
    except ClientError as exc:
        if not _missing(exc):
            raise
