"""Sync sessions: open or resume one, verify and complete it, report an episode's state.

Locking: every change to an episode happens with its row locked (``SELECT … FOR UPDATE`` on
MySQL/MariaDB, ``BEGIN IMMEDIATE`` on SQLite). Hashing during ``complete`` runs without a
lock; what it found is applied under the lock, and only if the session is still current.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from keystone_receiver.db import (
    EpisodeStatus,
    ObjectState,
    ReceivedEpisode,
    ReceivedObject,
    run_transaction,
    transaction,
    utcnow,
)
from keystone_receiver.errors import (
    AlreadySynced,
    InvalidRequest,
    SessionMismatch,
    UnknownEpisode,
)
from keystone_receiver.errors import ObjectMismatch as ObjectMismatchError
from keystone_receiver.protocol import (
    EpisodeManifest,
    EpisodeState,
    EpisodeSynced,
    ObjectMismatch,
    ObjectProgress,
    ObjectUpload,
    PartUpload,
    SessionOpened,
    SyncedObject,
)
from keystone_receiver.settings import MIB, ReceiverSettings
from keystone_receiver.storage import ReceiverStore

log = logging.getLogger("keystone.receiver")

MAX_PARTS = 10_000  # S3's limit per multipart upload


def object_key(factory_id: str, device_id: str, episode_id: str, name: str) -> str:
    return f"{factory_id}/{device_id}/{episode_id}/{name}"


def part_size_for(size: int, configured: int) -> int:
    """``configured``, or the next whole MiB that keeps ``size`` within 10,000 parts."""
    needed = -(-size // MAX_PARTS)
    return configured if needed <= configured else -(-needed // MIB) * MIB


def part_sizes(size: int, part_size: int) -> dict[int, int]:
    """Part number (from 1) → bytes, for an object of ``size`` cut into ``part_size`` parts."""
    count = max(1, -(-size // part_size))
    return {n: min(part_size, size - (n - 1) * part_size) for n in range(1, count + 1)}


def new_session_id() -> str:
    return secrets.token_urlsafe(18)


@dataclass(frozen=True)
class _ObjectView:
    """An object row as ``complete`` read it, for the work done without a lock."""

    id: int
    name: str
    size: int
    sha256: str
    key: str
    state: ObjectState
    upload_id: str | None
    part_size: int | None

    @classmethod
    def of(cls, row: ReceivedObject) -> _ObjectView:
        return cls(
            row.id, row.name, row.size, row.sha256, row.key, row.state, row.upload_id, row.part_size
        )


@dataclass(frozen=True)
class _Finding:
    """What verifying one object found: a mismatch, and whether its stored bytes must go."""

    obj: _ObjectView
    mismatch: ObjectMismatch | None
    reset: bool = False


@dataclass(frozen=True)
class _Stale:
    key: str
    upload_id: str | None


def _synced(episode: ReceivedEpisode) -> EpisodeSynced:
    assert episode.synced_at is not None
    return EpisodeSynced(
        episode_id=episode.episode_id,
        synced_at=episode.synced_at,
        objects=[
            SyncedObject(name=o.name, size=o.size, sha256=o.sha256, key=o.key)
            for o in episode.objects
        ],
    )


def _already_synced(episode: ReceivedEpisode) -> AlreadySynced:
    assert episode.synced_at is not None
    return AlreadySynced(
        f"episode {episode.episode_id} is already synced; nothing to upload",
        episode_id=episode.episode_id,
        synced_at=episode.synced_at,
    )


class SyncSessions:
    """The receiver's behaviour, independent of HTTP (``app.py`` only maps it to routes)."""

    def __init__(self, engine: Engine, store: ReceiverStore, settings: ReceiverSettings) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings

    # --- POST /sync/episode -------------------------------------------------------------

    def open(self, manifest: EpisodeManifest) -> SessionOpened:
        """Start, resume or replace the episode's session and say where each object goes."""
        limit = self.settings.max_objects
        if len(manifest.objects) > limit:
            raise InvalidRequest(
                f"at most {limit} objects per episode",
                detail=[
                    {
                        "loc": ["body", "objects"],
                        "msg": f"List should have at most {limit} items",
                        "type": "too_long",
                    }
                ],
            )
        self._insert_if_new(manifest)
        created: list[tuple[str, str]] = []

        def locked(session: Session) -> tuple[SessionOpened, list[_Stale]]:
            # A retried attempt starts from scratch: uploads the failed one made are dropped.
            self._abort_quietly(created)
            created.clear()
            return self._open_locked(session, manifest, created)

        try:
            opened, stale = run_transaction(self.engine, locked)
        except BaseException:
            self._abort_quietly(created)
            raise
        for item in stale:
            self._remove_quietly(item)
        return opened

    def _insert_if_new(self, manifest: EpisodeManifest) -> None:
        """Insert the episode the first time; a concurrent twin's insert wins the same way."""
        try:
            with transaction(self.engine) as session:
                exists = session.scalar(
                    select(ReceivedEpisode.id).where(
                        ReceivedEpisode.episode_id == manifest.episode_id
                    )
                )
                if exists is not None:
                    return
                now = utcnow()
                episode = ReceivedEpisode(
                    episode_id=manifest.episode_id,
                    factory_id=manifest.factory_id,
                    device_id=manifest.device_id,
                    task_id=manifest.task_id,
                    status=EpisodeStatus.INCOMPLETE,
                    session=new_session_id(),
                    session_count=1,
                    complete_count=0,
                    episode_metadata=manifest.metadata,
                    created_at=now,
                    updated_at=now,
                )
                episode.objects = self._object_rows(manifest)
                session.add(episode)
                log.info("episode %s: session opened", manifest.episode_id)
        except IntegrityError:
            pass  # the other sender inserted it first; both continue with its row

    def _object_rows(self, manifest: EpisodeManifest) -> list[ReceivedObject]:
        return [self._object_row(manifest, position) for position in range(len(manifest.objects))]

    def _object_row(self, manifest: EpisodeManifest, position: int) -> ReceivedObject:
        spec = manifest.objects[position]
        multipart = spec.size > self.settings.multipart_threshold
        return ReceivedObject(
            position=position,
            name=spec.name,
            size=spec.size,
            sha256=spec.sha256,
            key=object_key(manifest.factory_id, manifest.device_id, manifest.episode_id, spec.name),
            state=ObjectState.AWAITING_UPLOAD,
            part_size=part_size_for(spec.size, self.settings.part_size) if multipart else None,
        )

    def _lock(self, session: Session, episode_id: str) -> ReceivedEpisode | None:
        return session.scalar(
            select(ReceivedEpisode)
            .where(ReceivedEpisode.episode_id == episode_id)
            .options(selectinload(ReceivedEpisode.objects))
            .with_for_update()
        )

    def _open_locked(
        self, session: Session, manifest: EpisodeManifest, created: list[tuple[str, str]]
    ) -> tuple[SessionOpened, list[_Stale]]:
        episode = self._lock(session, manifest.episode_id)
        assert episode is not None  # inserted before, and episodes are never deleted
        if episode.status is EpisodeStatus.COMPLETE:
            raise _already_synced(episode)
        stale: list[_Stale] = []
        if not self._same_manifest(episode, manifest):
            stale = self._replace_session(session, episode, manifest)
        episode.episode_metadata = manifest.metadata
        episode.updated_at = utcnow()
        rows = {o.name: o for o in episode.objects}
        uploads = [self._upload_for(rows[spec.name], created) for spec in manifest.objects]
        return SessionOpened(
            session=episode.session, episode_id=episode.episode_id, uploads=uploads
        ), stale

    @staticmethod
    def _same_manifest(episode: ReceivedEpisode, manifest: EpisodeManifest) -> bool:
        if (episode.factory_id, episode.device_id, episode.task_id) != (
            manifest.factory_id,
            manifest.device_id,
            manifest.task_id,
        ):
            return False
        stored = {(o.name, o.size, o.sha256) for o in episode.objects}
        return stored == {(o.name, o.size, o.sha256) for o in manifest.objects}

    def _replace_session(
        self, session: Session, episode: ReceivedEpisode, manifest: EpisodeManifest
    ) -> list[_Stale]:
        """A new session for a changed manifest; objects that did not change keep progress."""
        wanted = {row.name: row for row in self._object_rows(manifest)}
        kept: list[ReceivedObject] = []
        stale: list[_Stale] = []
        for row in list(episode.objects):
            new = wanted.get(row.name)
            if new is not None and (new.size, new.sha256, new.key, new.part_size) == (
                row.size,
                row.sha256,
                row.key,
                row.part_size,
            ):
                row.position = new.position
                kept.append(row)
                del wanted[row.name]
            else:
                stale.append(_Stale(row.key, row.upload_id))
                episode.objects.remove(row)
        # Deletes first: a replacement may reuse a removed row's (episode, name).
        session.flush()
        episode.objects.extend(wanted.values())
        episode.factory_id = manifest.factory_id
        episode.device_id = manifest.device_id
        episode.task_id = manifest.task_id
        episode.session = new_session_id()
        episode.session_count += 1
        log.info(
            "episode %s: manifest changed, session %d opened (%d objects kept)",
            episode.episode_id,
            episode.session_count,
            len(kept),
        )
        # Names are unique, so no stale key is a kept key; a stale key may be a new row's
        # key (same name, new content) and its old bytes must go.
        return stale

    def _upload_for(self, row: ReceivedObject, created: list[tuple[str, str]]) -> ObjectUpload:
        base = {"name": row.name, "size": row.size, "key": row.key}
        if row.state is ObjectState.VERIFIED:
            return ObjectUpload(**base, done=True)
        if row.part_size is None:
            return ObjectUpload(**base, done=False, url=self.store.presign_put(row.key))
        sizes = part_sizes(row.size, row.part_size)
        stored: set[int] = set()
        if row.upload_id is not None:
            listed = self.store.stored_parts(row.key, row.upload_id, sizes)
            if listed is not None:
                stored = set(listed)
            elif self.store.size_of(row.key) == row.size:
                # The upload is gone because a ``complete`` assembled it and then failed
                # before recording that: every part is in; ``complete`` will verify it.
                stored = set(sizes)
            else:
                row.upload_id = None
        if row.upload_id is None:
            row.upload_id = self.store.create_multipart(row.key)
            row.state = ObjectState.UPLOADING_PARTS
            created.append((row.key, row.upload_id))
        upload_id = row.upload_id
        parts = [
            PartUpload(
                part_number=number,
                size=size,
                url=self.store.presign_part(row.key, upload_id, number),
                done=number in stored,
            )
            for number, size in sizes.items()
        ]
        return ObjectUpload(**base, done=False, part_size=row.part_size, parts=parts)

    # --- POST /sync/episode/{id}/complete ------------------------------------------------

    def complete(self, episode_id: str, session_id: str) -> EpisodeSynced:
        """Verify every object of the session and mark the episode complete exactly once."""

        def read(session: Session) -> EpisodeSynced | list[_ObjectView]:
            episode = session.scalar(
                select(ReceivedEpisode)
                .where(ReceivedEpisode.episode_id == episode_id)
                .options(selectinload(ReceivedEpisode.objects))
            )
            if episode is None:
                raise UnknownEpisode(f"no episode {episode_id} was announced to this receiver")
            if episode.status is EpisodeStatus.COMPLETE:
                return _synced(episode)
            self._check_session(episode, session_id)
            return [_ObjectView.of(o) for o in episode.objects]

        snapshot = run_transaction(self.engine, read)
        if isinstance(snapshot, EpisodeSynced):
            return snapshot
        findings = [self._verify(obj) for obj in snapshot if obj.state is not ObjectState.VERIFIED]
        result = run_transaction(
            self.engine, lambda session: self._finish(session, episode_id, session_id, findings)
        )
        if isinstance(result, EpisodeSynced):
            return result
        names = ", ".join(f"{m.name} ({m.reason})" for m in result)
        raise ObjectMismatchError(
            f"objects do not match the manifest and must be uploaded again: {names}",
            objects=[m.model_dump(exclude_unset=True) for m in result],
        )

    @staticmethod
    def _check_session(episode: ReceivedEpisode, session_id: str) -> None:
        if episode.session != session_id:
            raise SessionMismatch(
                f"session {session_id} is not the current session of episode "
                f"{episode.episode_id}; POST /api/v1/sync/episode again",
                session=episode.session,
            )

    def _verify(self, obj: _ObjectView) -> _Finding:
        """Assemble the object if it is multipart, then check its size and SHA-256."""
        if obj.part_size is not None and obj.upload_id is not None:
            sizes = part_sizes(obj.size, obj.part_size)
            stored = self.store.stored_parts(obj.key, obj.upload_id, sizes)
            if stored is not None:
                missing = sorted(set(sizes) - set(stored))
                if missing:
                    # Keep the upload: the parts that are in stay, only these are re-sent.
                    mismatch = ObjectMismatch(
                        name=obj.name,
                        reason="missing",
                        expected=obj.size,
                        actual=None,
                        missing_parts=missing,
                    )
                    return _Finding(obj, mismatch)
                outcome = self.store.complete_multipart(
                    obj.key, obj.upload_id, [stored[n] for n in sorted(sizes)]
                )
                if outcome == "rejected":
                    return self._mismatch(obj, "missing", None)  # reset: a new upload
                # "gone": a concurrent ``complete`` assembled it first; the checks apply.
        size = self.store.size_of(obj.key)
        if size is None:
            return self._mismatch(obj, "missing", None)
        if size != obj.size:
            return self._mismatch(obj, "size", size)
        hashed = self.store.sha256_of(obj.key)
        if hashed is None:
            return self._mismatch(obj, "missing", None)
        digest, read = hashed
        if read != obj.size:  # replaced between HEAD and GET
            return self._mismatch(obj, "size", read)
        if digest != obj.sha256:
            return self._mismatch(obj, "sha256", digest)
        return _Finding(obj, None)

    @staticmethod
    def _mismatch(obj: _ObjectView, reason: str, actual: int | str | None) -> _Finding:
        expected: int | str = obj.sha256 if reason == "sha256" else obj.size
        mismatch = ObjectMismatch.model_validate(
            {"name": obj.name, "reason": reason, "expected": expected, "actual": actual}
        )
        return _Finding(obj, mismatch, reset=True)

    def _finish(
        self, session: Session, episode_id: str, session_id: str, findings: list[_Finding]
    ) -> EpisodeSynced | list[ObjectMismatch]:
        """Apply what verification found, under the lock and only for the same session."""
        episode = self._lock(session, episode_id)
        assert episode is not None
        if episode.status is EpisodeStatus.COMPLETE:
            return _synced(episode)  # a concurrent complete won; this one is not counted
        self._check_session(episode, session_id)
        now = utcnow()
        rows = {o.id: o for o in episode.objects}
        mismatches: list[ObjectMismatch] = []
        for finding in findings:
            row = rows.get(finding.obj.id)
            if row is None:
                continue
            if finding.mismatch is None:
                if row.upload_id is not None and row.upload_id != finding.obj.upload_id:
                    # A concurrent POST started another upload while this one was assembled.
                    self.store.abort_multipart(row.key, row.upload_id)
                row.state = ObjectState.VERIFIED
                row.verified_at = now
                row.upload_id = None
                continue
            mismatches.append(finding.mismatch)
            if finding.reset:
                # Storage first: once the row is reset, a POST may hand out a fresh URL.
                self.store.delete(row.key)
                if row.upload_id is not None:
                    self.store.abort_multipart(row.key, row.upload_id)
                row.state = ObjectState.AWAITING_UPLOAD
                row.upload_id = None
                row.verified_at = None
        if mismatches:
            episode.updated_at = now
            log.info(
                "episode %s: complete refused, %d object(s) mismatch",
                episode_id,
                len(mismatches),
            )
            return mismatches
        session.flush()
        # Conditional, so that whatever else happens exactly one completion is recorded.
        done = session.execute(
            update(ReceivedEpisode)
            .where(
                ReceivedEpisode.id == episode.id,
                ReceivedEpisode.status == EpisodeStatus.INCOMPLETE,
                ReceivedEpisode.session == session_id,
            )
            .values(
                status=EpisodeStatus.COMPLETE,
                synced_at=now,
                updated_at=now,
                complete_count=ReceivedEpisode.complete_count + 1,
            )
            .execution_options(synchronize_session=False)
        )
        session.refresh(episode)
        if getattr(done, "rowcount", 0) != 1:
            # Unreachable while the row is locked; the WHERE alone already rules out a second
            # completion. Asking again gets the stored answer.
            raise SessionMismatch(
                f"episode {episode_id} changed while completing; ask again",
                session=episode.session,
            )
        log.info("episode %s: complete, synced at %s", episode_id, episode.synced_at)
        return _synced(episode)

    # --- GET /sync/episode/{id} ------------------------------------------------------------

    def state(self, episode_id: str) -> EpisodeState:
        with transaction(self.engine) as session:
            episode = session.scalar(
                select(ReceivedEpisode)
                .where(ReceivedEpisode.episode_id == episode_id)
                .options(selectinload(ReceivedEpisode.objects))
            )
            if episode is None:
                raise UnknownEpisode(f"no episode {episode_id} was announced to this receiver")
            complete = episode.status is EpisodeStatus.COMPLETE
            return EpisodeState(
                episode_id=episode.episode_id,
                status=episode.status.value,
                session=episode.session,
                synced_at=episode.synced_at,
                session_count=episode.session_count,
                complete_count=episode.complete_count,
                objects=[
                    ObjectProgress(
                        name=o.name,
                        size=o.size,
                        sha256=o.sha256,
                        key=o.key,
                        done=complete or o.state is ObjectState.VERIFIED,
                    )
                    for o in episode.objects
                ],
            )

    # --- clean-up ------------------------------------------------------------------------

    def _abort_quietly(self, uploads: list[tuple[str, str]]) -> None:
        for key, upload_id in uploads:
            try:
                self.store.abort_multipart(key, upload_id)
            except Exception:
                log.warning("could not abort multipart upload %s of %s", upload_id, key)

    def _remove_quietly(self, item: _Stale) -> None:
        """Drop what a replaced session left (best effort: ``complete`` re-checks anyway)."""
        try:
            if item.upload_id is not None:
                self.store.abort_multipart(item.key, item.upload_id)
            self.store.delete(item.key)
        except Exception:
            log.warning("could not remove stale object %s", item.key)
