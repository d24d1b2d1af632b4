"""Build the objects a run needs from settings: one place, used by tasks and the CLI."""

from __future__ import annotations

import importlib
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from config.settings import Settings, SettingsError
from worker.scan.engine import Deps
from worker.sources.base import OPReader, PortalReader
from worker.state.db import alembic_config, make_engine, migrate, session_factory


def csv_limits(settings: Settings) -> Any:
    from worker.sources.csv_source import CsvLimits

    return CsvLimits(settings.csv_max_field_chars, settings.csv_max_line_chars)


def op_reader(settings: Settings, op_dir: Path | None = None) -> OPReader:
    if op_dir is not None or settings.op_source == "csv":
        from worker.sources.csv_source import CsvOPSource

        directory = op_dir or settings.op_dir
        if directory is None:
            raise SettingsError("invalid setting OPRECON_OP_DIR: required when op_source=csv")
        return CsvOPSource(Path(directory), csv_limits(settings), settings.op_zone)
    from worker.sources.sql_source import SqlOPSource

    if not settings.op_db_url:
        raise SettingsError("invalid setting OPRECON_OP_DB_URL: required when op_source=sql")
    return SqlOPSource(settings.op_db_url, settings.op_zone)


def source_problem(settings: Settings) -> str | None:
    """What makes the configured sources unusable before any read (a missing folder, a
    missing URL), in one line naming the setting; None when they look usable. A worker
    checks this at start, so a renamed OP folder stops it at once instead of failing
    every scan later. Reachability is `oprecon health`'s business, not start-up's."""
    checks: list[tuple[str, Any, str]] = []
    if settings.op_source == "csv":
        checks.append(("OPRECON_OP_DIR", settings.op_dir, "op_source=csv"))
    elif not settings.op_db_url:
        return "invalid setting OPRECON_OP_DB_URL: required when op_source=sql"
    if settings.portal_adapter:
        try:
            portal_adapter(settings)
        except SettingsError as err:
            return str(err)
    elif settings.portal_source == "http":
        if not settings.portal_url:
            return "invalid setting OPRECON_PORTAL_URL: required when portal_source=http"
    else:
        checks.append(("OPRECON_PORTAL_DIR", settings.portal_dir, "portal_source=csv"))
    for name, directory, when in checks:
        if directory is None:
            return f"invalid setting {name}: required when {when}"
        if not Path(directory).is_dir():
            return f"invalid setting {name}: no folder at {directory}"
    return None


def portal_adapter(settings: Settings, portal_dir: Path | None = None) -> Any:
    if portal_dir is not None:
        from worker.sources.csv_source import CsvPortalSource

        return CsvPortalSource(Path(portal_dir), csv_limits(settings))
    if settings.portal_adapter:
        module, _, name = settings.portal_adapter.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as err:
            raise SettingsError(
                f"invalid setting OPRECON_PORTAL_ADAPTER: cannot import {settings.portal_adapter}"
            ) from err
        return cls(settings)
    if settings.portal_source == "http":
        from worker.sources.portal_http import HttpPortal

        if not settings.portal_url:
            raise SettingsError(
                "invalid setting OPRECON_PORTAL_URL: required when portal_source=http"
            )
        token = settings.portal_token.get_secret_value() if settings.portal_token else None
        return HttpPortal(
            settings.portal_url,
            token,
            timeout=settings.portal_timeout_seconds,
            max_retries=settings.portal_max_retries,
            max_response_bytes=settings.portal_max_response_bytes,
            request_deadline=settings.portal_request_deadline_seconds,
            max_pages=settings.portal_max_pages,
        )
    from worker.sources.csv_source import CsvPortalSource

    if settings.portal_dir is None:
        raise SettingsError("invalid setting OPRECON_PORTAL_DIR: required when portal_source=csv")
    return CsvPortalSource(Path(settings.portal_dir), csv_limits(settings))


@lru_cache(maxsize=8)
def _sessions_for(url: str) -> sessionmaker[Session]:
    return session_factory(make_engine(url))


_MIGRATING = threading.Lock()


def _migrated(url: str) -> None:
    """Once per process and database: tasks call build_deps every time. Under a lock:
    Alembic keeps its context in module globals, so two threads of one process (a pool
    child's warm-up and its first task) must not migrate at once."""
    with _MIGRATING:
        _migrate_once(url)


@lru_cache(maxsize=8)
def _migrate_once(url: str) -> None:
    migrate(url)


def state_sessions(settings: Settings, *, migrate_first: bool = True) -> sessionmaker[Session]:
    if migrate_first:
        _migrated(settings.state_db_url)
    return _sessions_for(settings.state_db_url)


def dry_run_sessions(settings: Settings) -> sessionmaker[Session]:
    """Sessions for a dry run: never migrate (that would write). With no SQLite state
    database yet, plan against an empty in-memory one instead of creating the file."""
    url = make_url(settings.state_db_url)
    missing_file = (
        url.get_backend_name() == "sqlite"
        and url.database not in (None, "", ":memory:")
        and not Path(url.database).exists()
    )
    if missing_file:
        engine = make_engine("sqlite://", poolclass=StaticPool)
        with engine.begin() as conn:
            cfg = alembic_config("sqlite://")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        return session_factory(engine)
    return _sessions_for(settings.state_db_url)


def build_deps(
    settings: Settings,
    *,
    op_dir: Path | None = None,
    portal_dir: Path | None = None,
    sessions: sessionmaker[Session] | None = None,
) -> Deps:
    portal: PortalReader = portal_adapter(settings, portal_dir)
    return Deps(
        settings=settings,
        sessions=sessions or state_sessions(settings),
        op=op_reader(settings, op_dir),
        portal=portal,
        portal_writable=bool(getattr(portal, "writable", False)),
    )
