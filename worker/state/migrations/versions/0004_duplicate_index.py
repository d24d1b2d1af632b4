"""duplicate index: learned matcher parameters and kept blocking keys

Revision ID: 0004_duplicate_index
Revises: 0003_claims
Create Date: 2026-11-30 05:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0004_duplicate_index'
down_revision = '0003_claims'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('duplicate_index',
    sa.Column('practice', sa.String(length=64), nullable=False),
    sa.Column('token', sa.String(length=32), nullable=False),
    sa.Column('built_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('covered_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('contacts', sa.Integer(), nullable=False),
    sa.Column('model', sa.JSON(), nullable=False),
    sa.Column('keys', sa.LargeBinary(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('practice')
    )
    op.create_table('duplicate_key_changes',
    sa.Column('practice', sa.String(length=64), nullable=False),
    sa.Column('contact_id', sa.String(length=64), nullable=False),
    sa.Column('keys', sa.JSON(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('practice', 'contact_id')
    )


def downgrade() -> None:
    op.drop_table('duplicate_key_changes')
    op.drop_table('duplicate_index')
