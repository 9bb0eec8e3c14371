"""Start-up work every entry point shares: migrate (if enabled) and ensure the admin account."""

from __future__ import annotations

from sqlalchemy import Engine

from keystone_core import migrate
from keystone_core.db import check_database, session_scope
from keystone_core.services.accounts import ensure_admin
from keystone_core.settings import Settings


def prepare_database(engine: Engine, settings: Settings) -> None:
    """Bring the schema to head (lock-guarded, so replicas may call it together) and make
    sure the bootstrap admin exists with the configured password."""
    check_database(engine)
    if settings.migrate_on_start:
        migrate.upgrade(engine, lock_dir=settings.data_dir)
    with session_scope(engine) as session:
        ensure_admin(session, settings)
