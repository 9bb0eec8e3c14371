"""What a caller may see: its role and factories (none = every factory, admins only)."""

from __future__ import annotations

from dataclasses import dataclass

from keystone_core.models import Role


@dataclass(frozen=True)
class Scope:
    role: Role
    factory_ids: frozenset[int] | None  # None: every factory
    user_id: int | None = None
    data_collector_id: int | None = None
    inspector_id: int | None = None

    @classmethod
    def everything(cls) -> Scope:
        """Keystone itself (CLI, pipelines): no restriction."""
        return cls(role=Role.ADMIN, factory_ids=None)

    def allows(self, factory_id: int | None) -> bool:
        """``None`` factory means a global row (catalog), visible to everyone."""
        return factory_id is None or self.factory_ids is None or factory_id in self.factory_ids

    def can_see(self, factory_id: int) -> bool:
        """Rows of factory ``factory_id`` are visible (admins of every factory see all)."""
        return self.factory_ids is None or factory_id in self.factory_ids
