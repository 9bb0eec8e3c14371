"""QA previews in the object store: which episodes get them, where they go, storing them.

After QA has a verdict (and outside any transaction) ``publish_previews`` draws the
contact sheet and the message-rate timeline (``keystone_core.qa.preview``) and puts them
in the episode's bucket under ``{derived_prefix}{factory_id}/{episode_id}/`` — apart from
the device prefixes ``{factory_id}/{device_id}/``, which Keystone never writes. It returns
what ``episode.meta["preview"]`` records: the keys (None for an image not drawn), when,
and notes. It never raises: a preview is a convenience for the inspector, never a reason
for QA to fail.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from keystone_core import clock
from keystone_core.qa.checks import (
    AUTO_APPROVED,
    NEEDS_INSPECTION,
    QA_FAILED,
    Expectations,
    QAConfig,
)
from keystone_core.qa.inventory import Limits
from keystone_core.qa.preview import CONTACT_SHEET, RATE_TIMELINE, render_previews
from keystone_core.qa.run import Report
from keystone_core.qa.source import S3Source
from keystone_core.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

PREVIEW_KINDS = ("contact_sheet", "rate_timeline")
CONTENT_TYPES = {"contact_sheet": "image/jpeg", "rate_timeline": "image/png"}
FILES = {"contact_sheet": CONTACT_SHEET, "rate_timeline": RATE_TIMELINE}
VERDICTS = {
    "doubtful": frozenset({NEEDS_INSPECTION, QA_FAILED}),
    "all": frozenset({AUTO_APPROVED, NEEDS_INSPECTION, QA_FAILED}),
    "off": frozenset(),
}
MAX_SILENCES_RECORDED = 20


def wanted(settings: Settings, verdict: str | None = None) -> bool:
    """Whether an episode with this verdict gets previews (any verdict: whether some may)."""
    verdicts = VERDICTS[settings.qa_preview]
    return bool(verdicts) if verdict is None else verdict in verdicts


def preview_keys(settings: Settings, factory_id: int, episode_id: str) -> dict[str, str]:
    """Object keys of an episode's previews in its factory bucket."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", episode_id) or "_"
    base = f"{settings.derived_prefix}{factory_id}/{safe}/"
    return {kind: base + FILES[kind] for kind in PREVIEW_KINDS}


def publish_previews(
    s3: S3Client,
    settings: Settings,
    *,
    factory_id: int,
    episode_id: str,
    bucket: str,
    key: str,
    report: Report,
    expectations: Expectations,
    config: QAConfig,
) -> dict[str, Any]:
    """Draw and store the previews of one scored episode (``report.inventory`` is what QA
    read); what to record in ``episode.meta["preview"]``. Never raises."""
    record: dict[str, Any] = dict.fromkeys(PREVIEW_KINDS)
    record["generated_at"] = clock.now().isoformat()
    notes: list[str] = []
    try:
        size = report.stats.get("size_bytes")
        source = S3Source(s3, bucket, key, int(size) if size is not None else None)
        previews = render_previews(
            source,
            report.inventory,
            config,
            title=f"{episode_id}  {report.verdict}  score {report.score:.3f}",
            required_topics=expectations.required_topics,
            limits=Limits(seconds=settings.qa_time_budget_s),
        )
        notes += previews.notes
        record["seconds"] = previews.seconds
        record["silences"] = [
            {
                "topic": s.topic,
                "start_s": round((s.start_ns - (report.inventory.start_ns or 0)) / 1e9, 3)
                if report.inventory is not None
                else None,
                "seconds": round(s.seconds, 3),
            }
            for s in previews.silences[:MAX_SILENCES_RECORDED]
        ]
        keys = preview_keys(settings, factory_id, episode_id)
        for kind, data in (
            ("contact_sheet", previews.contact_sheet),
            ("rate_timeline", previews.rate_timeline),
        ):
            if data is None:
                continue
            s3.put_object(Bucket=bucket, Key=keys[kind], Body=data, ContentType=CONTENT_TYPES[kind])
            record[kind] = keys[kind]
    except Exception as exc:  # the store refused, a bug in drawing: noted, QA goes on
        log.warning("previews of episode %s not stored: %s", episode_id, exc)
        notes.append(f"previews not stored: {exc}"[:300])
    record["notes"] = notes
    return record
