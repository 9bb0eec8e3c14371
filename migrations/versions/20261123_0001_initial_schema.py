"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 10:19:30.538497
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import keystone_core.db


revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('organizations',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('deleted_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('slug', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name'),
    sa.UniqueConstraint('slug')
    )
    with op.batch_alter_table('organizations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_organizations_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_organizations_deleted_at'), ['deleted_at'], unique=False)

    op.create_table('robot_types',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('deleted_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('manufacturer', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('end_effector', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
    sa.Column('sensor_suite', sa.JSON(), nullable=False),
    sa.Column('ros_topics', sa.JSON(), nullable=False),
    sa.Column('capabilities', sa.JSON(), nullable=False),
    sa.Column('qa_config', sa.JSON(), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('model')
    )
    with op.batch_alter_table('robot_types', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_robot_types_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_robot_types_deleted_at'), ['deleted_at'], unique=False)

    op.create_table('skills',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('deleted_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('slug', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
    sa.Column('version', sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('slug', 'version', name='uq_skills_slug_version')
    )
    with op.batch_alter_table('skills', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_skills_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_skills_deleted_at'), ['deleted_at'], unique=False)

    op.create_table('sops',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('deleted_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('slug', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
    sa.Column('version', sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('skill_sequence', sa.JSON(), nullable=False),
    sa.Column('content', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('slug', 'version', name='uq_sops_slug_version')
    )
    with op.batch_alter_table('sops', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sops_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_sops_deleted_at'), ['deleted_at'], unique=False)

    op.create_table('factories',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('deleted_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('organization_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('slug', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('location', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('timezone', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('production_start', sqlmodel.sql.sqltypes.AutoString(length=5), nullable=False),
    sa.Column('production_end', sqlmodel.sql.sqltypes.AutoString(length=5), nullable=False),
    sa.Column('production_days', sa.JSON(), nullable=False),
    sa.Column('allowed_networks', sa.JSON(), nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['organization_id'], ['organizations.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('slug')
    )
    with op.batch_alter_table('factories', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_factories_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_factories_deleted_at'), ['deleted_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_factories_organization_id'), ['organization_id'], unique=False)

    op.create_table('robot_config_templates',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('robot_type_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('filename', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('content', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['robot_type_id'], ['robot_types.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('robot_type_id', 'filename', name='uq_robot_config_templates_file')
    )
    with op.batch_alter_table('robot_config_templates', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_robot_config_templates_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_robot_config_templates_robot_type_id'), ['robot_type_id'], unique=False)

    op.create_table('audit_log',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('occurred_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('actor_type', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('actor_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('actor_account', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('action', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('entity_type', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('entity_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('factory_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('before', sa.JSON(), nullable=True),
    sa.Column('after', sa.JSON(), nullable=True),
    sa.Column('request_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.ForeignKeyConstraint(['factory_id'], ['factories.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_log_action'), ['action'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_created_at'), ['created_at'], unique=False)
        batch_op.create_index('ix_audit_log_entity', ['entity_type', 'entity_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_factory_id'), ['factory_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_occurred_at'), ['occurred_at'], unique=False)

    op.create_table('data_collectors',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('deleted_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('factory_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('operator_id', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
    sa.Column('email', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('certification', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['factory_id'], ['factories.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('factory_id', 'operator_id', name='uq_data_collectors_operator')
    )
    with op.batch_alter_table('data_collectors', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_data_collectors_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_data_collectors_deleted_at'), ['deleted_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_data_collectors_factory_id'), ['factory_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_data_collectors_status'), ['status'], unique=False)

    op.create_table('inspectors',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('deleted_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('factory_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('inspector_id', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
    sa.Column('email', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('certification_level', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['factory_id'], ['factories.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('factory_id', 'inspector_id', name='uq_inspectors_inspector_id')
    )
    with op.batch_alter_table('inspectors', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inspectors_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_inspectors_deleted_at'), ['deleted_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_inspectors_factory_id'), ['factory_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_inspectors_status'), ['status'], unique=False)

    op.create_table('outbox',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('event_type', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('factory_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('status', sa.Enum('pending', 'delivered', 'failed', name='outboxstatus', native_enum=False, length=32), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('delivered_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('last_error', sqlmodel.sql.sqltypes.AutoString(length=2048), nullable=False),
    sa.ForeignKeyConstraint(['factory_id'], ['factories.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_outbox_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_outbox_event_type'), ['event_type'], unique=False)
        batch_op.create_index(batch_op.f('ix_outbox_factory_id'), ['factory_id'], unique=False)
        batch_op.create_index('ix_outbox_status_due', ['status', 'next_attempt_at'], unique=False)

    op.create_table('robots',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('deleted_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('factory_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('robot_type_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('device_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('asset_id', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.Column('last_seen_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['factory_id'], ['factories.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['robot_type_id'], ['robot_types.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('device_id')
    )
    with op.batch_alter_table('robots', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_robots_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_robots_deleted_at'), ['deleted_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_robots_factory_id'), ['factory_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_robots_robot_type_id'), ['robot_type_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_robots_status'), ['status'], unique=False)

    op.create_table('scenes',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('deleted_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('factory_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('initial_scene_layout_template', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['factory_id'], ['factories.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    with op.batch_alter_table('scenes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_scenes_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_scenes_deleted_at'), ['deleted_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_scenes_factory_id'), ['factory_id'], unique=False)

    op.create_table('webhooks',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('url', sqlmodel.sql.sqltypes.AutoString(length=2048), nullable=False),
    sa.Column('secret', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('event_types', sa.JSON(), nullable=False),
    sa.Column('factory_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('is_active', sa.Boolean(), nullable=False),
    sa.Column('consecutive_failures', sa.Integer(), nullable=False),
    sa.Column('disabled_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['factory_id'], ['factories.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('webhooks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_webhooks_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_webhooks_factory_id'), ['factory_id'], unique=False)

    op.create_table('device_credentials',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('robot_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.Enum('ws_client', name='credentialkind', native_enum=False, length=32), nullable=False),
    sa.Column('token_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('token_prefix', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('last_used_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('revoked_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['robot_id'], ['robots.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    with op.batch_alter_table('device_credentials', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_device_credentials_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_device_credentials_revoked_at'), ['revoked_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_device_credentials_robot_id'), ['robot_id'], unique=False)

    op.create_table('subscenes',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('deleted_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('scene_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('initial_scene_layout', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['scene_id'], ['scenes.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('scene_id', 'name', name='uq_subscenes_scene_name')
    )
    with op.batch_alter_table('subscenes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_subscenes_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_subscenes_deleted_at'), ['deleted_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_subscenes_scene_id'), ['scene_id'], unique=False)

    op.create_table('users',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('deleted_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('account', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('password_hash', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('role', sa.Enum('admin', 'production_manager', 'data_collector', 'data_inspector', name='role', native_enum=False, length=32), nullable=False),
    sa.Column('display_name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('is_active', sa.Boolean(), nullable=False),
    sa.Column('data_collector_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('inspector_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('last_login_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['data_collector_id'], ['data_collectors.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['inspector_id'], ['inspectors.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('account')
    )
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_users_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_users_data_collector_id'), ['data_collector_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_users_deleted_at'), ['deleted_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_users_inspector_id'), ['inspector_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_users_role'), ['role'], unique=False)

    op.create_table('workstations',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('deleted_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('factory_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('robot_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('data_collector_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['data_collector_id'], ['data_collectors.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['factory_id'], ['factories.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['robot_id'], ['robots.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('factory_id', 'name', name='uq_workstations_factory_name')
    )
    with op.batch_alter_table('workstations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_workstations_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_workstations_data_collector_id'), ['data_collector_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_workstations_deleted_at'), ['deleted_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_workstations_factory_id'), ['factory_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_workstations_robot_id'), ['robot_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_workstations_status'), ['status'], unique=False)

    op.create_table('orders',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('deleted_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('factory_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('scene_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('target_count', sa.Integer(), nullable=False),
    sa.Column('episode_count', sa.Integer(), nullable=False),
    sa.Column('approved_count', sa.Integer(), nullable=False),
    sa.Column('priority', sa.Enum('low', 'normal', 'high', 'urgent', name='orderpriority', native_enum=False, length=32), nullable=False),
    sa.Column('status', sa.Enum('created', 'in_progress', 'paused', 'completed', 'cancelled', name='orderstatus', native_enum=False, length=32), nullable=False),
    sa.Column('deadline', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.Column('created_by_user_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.ForeignKeyConstraint(['created_by_user_id'], ['users.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['factory_id'], ['factories.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['scene_id'], ['scenes.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_orders_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_orders_created_by_user_id'), ['created_by_user_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_orders_deleted_at'), ['deleted_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_orders_factory_id'), ['factory_id'], unique=False)
        batch_op.create_index('ix_orders_factory_status', ['factory_id', 'status'], unique=False)
        batch_op.create_index(batch_op.f('ix_orders_scene_id'), ['scene_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_orders_status'), ['status'], unique=False)

    op.create_table('robot_workstation_bindings',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('robot_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('workstation_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('bound_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('unbound_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('bound_by_user_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.ForeignKeyConstraint(['bound_by_user_id'], ['users.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['robot_id'], ['robots.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['workstation_id'], ['workstations.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('robot_workstation_bindings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_robot_workstation_bindings_bound_by_user_id'), ['bound_by_user_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_robot_workstation_bindings_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_robot_workstation_bindings_robot_id'), ['robot_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_robot_workstation_bindings_workstation_id'), ['workstation_id'], unique=False)

    op.create_table('user_factories',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('user_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('factory_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.ForeignKeyConstraint(['factory_id'], ['factories.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('user_id', 'factory_id')
    )
    with op.batch_alter_table('user_factories', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_user_factories_created_at'), ['created_at'], unique=False)

    op.create_table('batches',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('deleted_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('batch_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('order_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('factory_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('workstation_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('notes', sa.Text(), nullable=False),
    sa.Column('target_count', sa.Integer(), nullable=False),
    sa.Column('episode_count', sa.Integer(), nullable=False),
    sa.Column('status', sa.Enum('pending', 'active', 'completed', 'cancelled', 'recalled', name='batchstatus', native_enum=False, length=32), nullable=False),
    sa.Column('started_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('ended_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('recalled_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('recall_reason', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['factory_id'], ['factories.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['order_id'], ['orders.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['workstation_id'], ['workstations.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('batch_id')
    )
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_batches_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_batches_deleted_at'), ['deleted_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_batches_factory_id'), ['factory_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_batches_order_id'), ['order_id'], unique=False)
        batch_op.create_index('ix_batches_order_status', ['order_id', 'status'], unique=False)
        batch_op.create_index(batch_op.f('ix_batches_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_batches_workstation_id'), ['workstation_id'], unique=False)

    op.create_table('tasks',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('deleted_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('task_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('batch_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('order_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('factory_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('workstation_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('robot_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('data_collector_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('scene_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('subscene_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('skill_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('sop_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('status', sa.Enum('pending', 'ready', 'in_progress', 'uploading', 'completed', 'failed', 'cancelled', name='taskstatus', native_enum=False, length=32), nullable=False),
    sa.Column('outcome_unknown', sa.Boolean(), nullable=False),
    sa.Column('user_token_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('min_duration_s', sa.Double(), nullable=True),
    sa.Column('max_duration_s', sa.Double(), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=False),
    sa.Column('assigned_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('ready_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('started_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('completed_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('upload_acked_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['data_collector_id'], ['data_collectors.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['factory_id'], ['factories.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['order_id'], ['orders.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['robot_id'], ['robots.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['scene_id'], ['scenes.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['skill_id'], ['skills.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['sop_id'], ['sops.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['subscene_id'], ['subscenes.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['workstation_id'], ['workstations.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('task_id'),
    sa.UniqueConstraint('user_token_hash')
    )
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_tasks_batch_id'), ['batch_id'], unique=False)
        batch_op.create_index('ix_tasks_batch_status', ['batch_id', 'status'], unique=False)
        batch_op.create_index(batch_op.f('ix_tasks_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_tasks_data_collector_id'), ['data_collector_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_tasks_deleted_at'), ['deleted_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_tasks_factory_id'), ['factory_id'], unique=False)
        batch_op.create_index('ix_tasks_factory_status', ['factory_id', 'status'], unique=False)
        batch_op.create_index(batch_op.f('ix_tasks_order_id'), ['order_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_tasks_robot_id'), ['robot_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_tasks_scene_id'), ['scene_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_tasks_skill_id'), ['skill_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_tasks_sop_id'), ['sop_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_tasks_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_tasks_subscene_id'), ['subscene_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_tasks_workstation_id'), ['workstation_id'], unique=False)

    op.create_table('episodes',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('episode_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('task_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('factory_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('order_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('batch_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('robot_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('device_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('status', sa.Enum('pending_qa', 'qa_running', 'auto_approved', 'needs_inspection', 'qa_failed', 'inspector_approved', 'rejected', name='episodestatus', native_enum=False, length=32), nullable=False),
    sa.Column('recording_date', sa.Date(), nullable=False),
    sa.Column('recording_started_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('duration_sec', sa.Double(), nullable=True),
    sa.Column('bucket', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('mcap_path', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('sidecar_path', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=True),
    sa.Column('file_size_bytes', sa.BigInteger(), nullable=True),
    sa.Column('checksum', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('verified_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('qa_score', sa.Double(), nullable=True),
    sa.Column('qa_lease_owner', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('qa_lease_expires_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('approved_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('quality_flag', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['factory_id'], ['factories.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['order_id'], ['orders.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['robot_id'], ['robots.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('episode_id'),
    sa.UniqueConstraint('task_id')
    )
    with op.batch_alter_table('episodes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_episodes_batch_id'), ['batch_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_episodes_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_episodes_device_id'), ['device_id'], unique=False)
        batch_op.create_index('ix_episodes_factory_date', ['factory_id', 'recording_date'], unique=False)
        batch_op.create_index(batch_op.f('ix_episodes_factory_id'), ['factory_id'], unique=False)
        batch_op.create_index('ix_episodes_factory_status', ['factory_id', 'status'], unique=False)
        batch_op.create_index(batch_op.f('ix_episodes_order_id'), ['order_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_episodes_recording_date'), ['recording_date'], unique=False)
        batch_op.create_index(batch_op.f('ix_episodes_robot_id'), ['robot_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_episodes_status'), ['status'], unique=False)
        batch_op.create_index('ix_episodes_status_lease', ['status', 'qa_lease_expires_at'], unique=False)

    op.create_table('inspections',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('episode_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('inspector_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('user_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('claimed_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('lease_expires_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('decision', sa.Enum('approved', 'rejected', name='inspectiondecision', native_enum=False, length=32), nullable=True),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=2048), nullable=False),
    sa.Column('failed_tags', sa.JSON(), nullable=False),
    sa.Column('decided_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['episode_id'], ['episodes.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['inspector_id'], ['inspectors.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('inspections', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inspections_created_at'), ['created_at'], unique=False)
        batch_op.create_index('ix_inspections_episode_decided', ['episode_id', 'decided_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_inspections_episode_id'), ['episode_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_inspections_inspector_id'), ['inspector_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_inspections_lease_expires_at'), ['lease_expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_inspections_user_id'), ['user_id'], unique=False)

    op.create_table('qa_results',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('episode_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('tier', sa.Enum('fast', 'thorough', name='qatier', native_enum=False, length=32), nullable=False),
    sa.Column('score', sa.Double(), nullable=False),
    sa.Column('hard_failure', sa.Boolean(), nullable=False),
    sa.Column('verdict', sa.Enum('pending_qa', 'qa_running', 'auto_approved', 'needs_inspection', 'qa_failed', 'inspector_approved', 'rejected', name='episodestatus', native_enum=False, length=32), nullable=False),
    sa.Column('checks', sa.JSON(), nullable=False),
    sa.Column('run_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('started_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('finished_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['episode_id'], ['episodes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('qa_results', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_qa_results_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_qa_results_episode_id'), ['episode_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_qa_results_run_id'), ['run_id'], unique=False)

    op.create_table('sync_jobs',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('episode_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('factory_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('target', sa.Enum('s3', 'http', name='synctarget', native_enum=False, length=32), nullable=False),
    sa.Column('status', sa.Enum('queued', 'in_progress', 'retry_wait', 'synced', 'failed', name='syncstatus', native_enum=False, length=32), nullable=False),
    sa.Column('attempt_count', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('last_error', sqlmodel.sql.sqltypes.AutoString(length=2048), nullable=False),
    sa.Column('lease_owner', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('lease_expires_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('remote_session', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('synced_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['episode_id'], ['episodes.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['factory_id'], ['factories.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('episode_id', 'target', name='uq_sync_jobs_episode_target')
    )
    with op.batch_alter_table('sync_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sync_jobs_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_sync_jobs_episode_id'), ['episode_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_sync_jobs_factory_id'), ['factory_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_sync_jobs_lease_expires_at'), ['lease_expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_sync_jobs_status'), ['status'], unique=False)
        batch_op.create_index('ix_sync_jobs_status_due', ['status', 'next_attempt_at'], unique=False)

    op.create_table('sync_attempts',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('sync_job_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('attempt_no', sa.Integer(), nullable=False),
    sa.Column('started_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('finished_at', keystone_core.db.UTCDateTime(), nullable=True),
    sa.Column('outcome', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('http_status', sa.Integer(), nullable=True),
    sa.Column('error', sqlmodel.sql.sqltypes.AutoString(length=2048), nullable=False),
    sa.ForeignKeyConstraint(['sync_job_id'], ['sync_jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('sync_attempts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sync_attempts_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_sync_attempts_sync_job_id'), ['sync_job_id'], unique=False)



def downgrade() -> None:
    # Dropping a table drops its indexes; dropping indexes first trips MySQL FK checks.
    op.drop_table('sync_attempts')
    op.drop_table('sync_jobs')
    op.drop_table('qa_results')
    op.drop_table('inspections')
    op.drop_table('episodes')
    op.drop_table('tasks')
    op.drop_table('batches')
    op.drop_table('user_factories')
    op.drop_table('robot_workstation_bindings')
    op.drop_table('orders')
    op.drop_table('workstations')
    op.drop_table('users')
    op.drop_table('subscenes')
    op.drop_table('device_credentials')
    op.drop_table('webhooks')
    op.drop_table('scenes')
    op.drop_table('robots')
    op.drop_table('outbox')
    op.drop_table('inspectors')
    op.drop_table('data_collectors')
    op.drop_table('audit_log')
    op.drop_table('robot_config_templates')
    op.drop_table('factories')
    op.drop_table('sops')
    op.drop_table('skills')
    op.drop_table('robot_types')
    op.drop_table('organizations')
