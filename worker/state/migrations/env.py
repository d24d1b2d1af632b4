"""Alembic environment: runs against the URL given by worker.state.db.alembic_config."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, pool, text

from worker.state.db import make_engine
from worker.state.models import Base

config = context.config
target_metadata = Base.metadata
# An arbitrary, fixed advisory-lock key: "oprecon" migrations.
MIGRATION_LOCK = 0x6F70726563


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        url = config.get_main_option("sqlalchemy.url") or ""
        engine = make_engine(url, poolclass=pool.NullPool)
        with engine.connect() as connection:
            _run(connection)
        engine.dispose()
    else:
        _run(connectable)


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection, target_metadata=target_metadata, render_as_batch=True
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Workers starting together on a fresh database each migrate: one at a time,
            # and the later ones then find the schema already at head.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
