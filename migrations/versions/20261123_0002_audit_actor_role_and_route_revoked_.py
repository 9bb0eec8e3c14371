"""audit actor role and route, revoked tokens

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 10:43:54.265084
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import keystone_core.db


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('revoked_tokens',
    sa.Column('created_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('updated_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.Column('jti', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('user_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('expires_at', keystone_core.db.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('jti')
    )
    with op.batch_alter_table('revoked_tokens', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_revoked_tokens_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_revoked_tokens_expires_at'), ['expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_revoked_tokens_user_id'), ['user_id'], unique=False)

    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.add_column(sa.Column('actor_role', sqlmodel.sql.sqltypes.AutoString(length=32), server_default='', nullable=False))
        batch_op.add_column(sa.Column('route', sqlmodel.sql.sqltypes.AutoString(length=255), server_default='', nullable=False))



def downgrade() -> None:
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_column('route')
        batch_op.drop_column('actor_role')

    op.drop_table('revoked_tokens')
