"""fix claims: lease, call marker, enqueue time, coalescing

Revision ID: 0002_claims
Revises: 0001
Create Date: 2026-11-30 01:45:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0002_claims'
down_revision = '0001'
branch_labels = None
depends_on = None

_COLUMNS = (
    ('claimed_by', lambda: sa.String(length=155)),
    ('claim_token', lambda: sa.String(length=64)),
    ('claimed_at', lambda: sa.DateTime(timezone=True)),
    ('lease_until', lambda: sa.DateTime(timezone=True)),
    ('called_at', lambda: sa.DateTime(timezone=True)),
    ('enqueued_at', lambda: sa.DateTime(timezone=True)),
    ('coalesce_key', lambda: sa.String(length=120)),
    ('coalesced_into', lambda: sa.Integer()),
)


def upgrade() -> None:
    with op.batch_alter_table('actions') as batch:
        for name, kind in _COLUMNS:
            batch.add_column(sa.Column(name, kind(), nullable=True))
        batch.create_index('ix_actions_coalesce', ['practice', 'coalesce_key'])


def downgrade() -> None:
    with op.batch_alter_table('actions') as batch:
        batch.drop_index('ix_actions_coalesce')
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
