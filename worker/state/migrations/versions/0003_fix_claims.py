"""fix claims: lease, call marker, enqueue time, coalescing

Revision ID: 0003_claims
Revises: 0002_web_console
Create Date: 2026-11-30 01:45:00
"""
import hashlib

import sqlalchemy as sa
from alembic import op

revision = '0003_claims'
down_revision = '0002_web_console'
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
    _forget_addresses()


def _forget_addresses() -> None:
    """Welcome resends journaled before this revision kept the parent's address in
    `params`; the address is now read from OP when the resend is applied (ids only), and
    the journal keeps a salted key of it for the once-per-address rule (the same formula
    as worker.model.text.address_key, frozen here)."""
    actions = sa.table('actions', sa.column('id', sa.Integer()), sa.column('kind', sa.String()),
                       sa.column('params', sa.JSON()))
    conn = op.get_bind()
    rows = conn.execute(sa.select(actions.c.id, actions.c.params)
                        .where(actions.c.kind == 'resend_welcome')).all()
    for action_id, params in rows:
        if isinstance(params, dict) and 'email' in params:
            kept = {k: v for k, v in params.items() if k != 'email'}
            text = (f"oprecon-address|{params.get('contact_id') or ''}|"
                    f"{(params.get('email') or '').strip().lower()}")
            kept['address'] = hashlib.sha256(text.encode()).hexdigest()[:16]
            conn.execute(actions.update().where(actions.c.id == action_id)
                         .values(params=kept))


def downgrade() -> None:
    with op.batch_alter_table('actions') as batch:
        batch.drop_index('ix_actions_coalesce')
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
