"""Shared fixtures: real PostgreSQL and Redis (they fail, never skip, when down),
SQLite state databases in tmp dirs, and a settings factory.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from config.settings import Settings, get_settings, load_settings

PG_ADMIN_URL = os.environ.get(
    "OPRECON_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("OPRECON_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
BROKER_URL = os.environ.get("OPRECON_TEST_BROKER_URL", "redis://127.0.0.1:6379/14")

# The test SMTP servers (aiosmtpd) log every connection at INFO from their own thread;
# a test that left the root logger at INFO would print them into the test output.
logging.getLogger("mail.log").setLevel(logging.WARNING)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests never see the developer's OPRECON_* variables."""
    for key in list(os.environ):
        if key.startswith("OPRECON_") and not key.startswith("OPRECON_TEST_"):
            monkeypatch.delenv(key)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A throw-away PostgreSQL database for this test session."""
    yield from _throwaway_database("oprecon_test")


def _throwaway_database(prefix: str) -> Iterator[str]:
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as err:  # pragma: no cover - CI must have PostgreSQL
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {err}")
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as err:  # pragma: no cover
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {err}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.sqlite'}"


@pytest.fixture
def make_settings(tmp_path: Path, sqlite_url: str) -> Any:
    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "state_db_url": sqlite_url,
            "redis_url": REDIS_URL,
            "broker_url": BROKER_URL,
            "heartbeat_dir": tmp_path / "heartbeat",
            "metrics_port": 0,
            "practice": "test",
        }
        values.update(overrides)
        # Tests of the time rules use short delays on purpose (the refusal has its own
        # test in tests/config/test_settings.py).
        if float(values.get("propagation_delay_minutes", 15)) < 15:
            values.setdefault("allow_unsafe_propagation_delay", True)
        return load_settings(**values)

    return factory


@pytest.fixture(scope="session")
def pg_state_engine() -> Iterator[sa.Engine]:
    """A PostgreSQL state database of its own (no other test commits into it), migrated
    once; tests reach it through `pg_sessions`, which rolls back."""
    from worker.state.db import make_engine, migrate

    for url in _throwaway_database("oprecon_state"):
        migrate(url)
        engine = make_engine(url)
        yield engine
        engine.dispose()


@pytest.fixture
def pg_sessions(pg_state_engine: sa.Engine) -> Iterator[Any]:
    """State-DB sessions on PostgreSQL inside one outer transaction, rolled back after the
    test: the code under test commits as usual (savepoints), and nothing outlives it."""
    from sqlalchemy.orm import sessionmaker

    conn = pg_state_engine.connect()
    outer = conn.begin()
    yield sessionmaker(bind=conn, join_transaction_mode="create_savepoint",
                       expire_on_commit=False)
    outer.rollback()
    conn.close()
