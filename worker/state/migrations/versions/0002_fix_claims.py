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
    sa.Column('claimed_by', sa.String(length=155), nullable=True),
    sa.Column('claim_token', sa.String(length=64), nullable=True),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('called_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('coalesce_key', sa.String(length=120), nullable=True),
    sa.Column('coalesced_into', sa.Integer(), nullable=True),
)


def upgrade() -> None:
    with op.batch_alter_table('actions') as batch:
        for column in _COLUMNS:
            batch.add_column(column.copy())
        batch.create_index('ix_actions_coalesce', ['practice', 'coalesce_key'])


def downgrade() -> None:
    with op.batch_alter_table('actions') as batch:
        batch.drop_index('ix_actions_coalesce')
        for column in reversed(_COLUMNS):
            batch.drop_column(column.name)
