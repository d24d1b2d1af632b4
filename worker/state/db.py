"""Engine, sessions and migrations for the state database.

SQLite is the embedded default (demo, small practices); PostgreSQL in production. The
schema is only ever created by Alembic, so both backends run the same migrations.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from worker.state.models import KeyValue

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str, **kwargs: Any) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str) -> None:
    """Bring the schema to the newest revision; safe to run on every start."""
    command.upgrade(alembic_config(url), "head")


def kv_get(session: Session, practice: str, key: str) -> dict[str, Any] | None:
    row = session.get(KeyValue, (practice, key))
    return dict(row.value) if row is not None else None


def kv_set(session: Session, practice: str, key: str, value: dict[str, Any], now: datetime) -> None:
    row = session.get(KeyValue, (practice, key))
    if row is None:
        session.add(KeyValue(practice=practice, key=key, value=value, updated_at=now))
    else:
        row.value = value
        row.updated_at = now


def kv_all(session: Session, practice: str) -> dict[str, dict[str, Any]]:
    rows = session.scalars(select(KeyValue).where(KeyValue.practice == practice))
    return {r.key: dict(r.value) for r in rows}
