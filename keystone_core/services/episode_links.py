"""Short-lived download links to an episode's objects: the MCAP, its sidecar, QA previews.

A link is an S3 presigned GET, signed for ``s3_public_endpoint_url`` (the address
inspectors' browsers reach) and valid ``presign_expires_s``. Signing is local CPU (about
half a millisecond, no request), so a page of the inspection queue carries links without
a query or a request per row. The single-link route also asks the store whether the object
is still there (edge objects may expire after a verified sync), so a link it hands out
works.

Preview keys are never taken from ``episode.meta`` as they stand (the metadata is
editable): a preview is linked only when the key recorded there is the one the derived
layout gives that episode, so no edit can make Keystone sign another object.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from botocore.exceptions import BotoCoreError, ClientError
from sqlmodel import Session

from keystone_core import clock
from keystone_core.errors import DependencyUnavailable, NotFoundError
from keystone_core.models import Episode
from keystone_core.services import crud
from keystone_core.services.previews import PREVIEW_KINDS, preview_keys
from keystone_core.services.production import EPISODES
from keystone_core.services.scope import Scope
from keystone_core.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

LinkKind = Literal["mcap", "sidecar", "contact_sheet", "rate_timeline"]
KINDS: tuple[LinkKind, ...] = ("mcap", "sidecar", "contact_sheet", "rate_timeline")
_MISSING = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})


@dataclass(frozen=True)
class Link:
    kind: str
    bucket: str
    key: str
    url: str
    expires_at: dt.datetime
    expires_in: int


def object_key(settings: Settings, episode: Episode, kind: str) -> str | None:
    """The key of one of the episode's objects in its bucket; None when it has none."""
    if kind == "mcap":
        return episode.mcap_path or None
    if kind == "sidecar":
        return episode.sidecar_path or None
    if kind not in PREVIEW_KINDS:
        raise ValueError(f"unknown link kind {kind!r}")
    recorded = (episode.meta or {}).get("preview")
    if not isinstance(recorded, dict):
        return None
    expected = preview_keys(settings, episode.factory_id, episode.episode_id)[kind]
    return expected if recorded.get(kind) == expected else None


def presign_get(presigner: S3Client, bucket: str, key: str, expires_s: int) -> str:
    return presigner.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s
    )


def links(
    settings: Settings, presigner: S3Client, episode: Episode
) -> tuple[dict[str, str | None], dt.datetime]:
    """A presigned URL per kind (None where the episode has no such object) and when they
    expire. No request: for lists."""
    expires_s = settings.presign_expires_s
    out: dict[str, str | None] = {}
    for kind in KINDS:
        key = object_key(settings, episode, kind)
        out[kind] = presign_get(presigner, episode.bucket, key, expires_s) if key else None
    return out, clock.now() + dt.timedelta(seconds=expires_s)


def link(
    session: Session,
    scope: Scope,
    episode_id: int,
    kind: str,
    *,
    settings: Settings,
    s3: S3Client,
    presigner: S3Client,
) -> Link:
    """One checked link: the episode in the caller's factories (else ``not_found``), the
    object recorded and present in the store (else ``not_available``)."""
    episode = crud.get_row(session, EPISODES, scope, episode_id)
    key = object_key(settings, episode, kind)
    if key is None:
        raise NotFoundError(
            f"episode {episode_id} has no {kind}"
            + (" (no preview generated yet)" if kind in PREVIEW_KINDS else ""),
            code="not_available",
            kind=kind,
        )
    try:
        s3.head_object(Bucket=episode.bucket, Key=key)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _MISSING:
            raise NotFoundError(
                f"the {kind} of episode {episode_id} is not in the object store",
                code="not_available",
                kind=kind,
            ) from None
        raise DependencyUnavailable(f"object store refused: {code}") from None
    except BotoCoreError as exc:
        raise DependencyUnavailable(f"object store unreachable: {exc}") from None
    expires_s = settings.presign_expires_s
    return Link(
        kind=kind,
        bucket=episode.bucket,
        key=key,
        url=presign_get(presigner, episode.bucket, key, expires_s),
        expires_at=clock.now() + dt.timedelta(seconds=expires_s),
        expires_in=expires_s,
    )
