"""One generated practice read four ways — CSV exports, SQLite, PostgreSQL and the
portal simulator over HTTP — gives the same snapshot, so the checks cannot tell
which source they ran on."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.conftest import PG_ADMIN_URL
from worker.devtools.generator import generate_practice
from worker.devtools.simulator import SimClock, Simulator, start_simulator
from worker.model.records import InvalidRecord
from worker.model.snapshot import Snapshot
from worker.scan.engine import read_snapshot
from worker.sources.csv_source import CsvOPSource, CsvPortalSource
from worker.sources.portal_http import HttpPortal
from worker.sources.sql_source import SqlOPSource, load_op_sql, make_engine

NOW = datetime(2026, 11, 2, 14, 0, tzinfo=UTC)


def comparable(snap: Snapshot) -> dict[str, Any]:
    valid = {
        "patients": snap.patients,
        "contacts": snap.contacts,
        "family": sorted(snap.family, key=lambda f: (f.patient_id, f.contact_id, f.role_reason)),
        "users": snap.users,
        "links": snap.links,
        "sources": snap.sources,
        "welcome_sent": snap.welcome_sent,
    }
    # Rows that cannot be parsed are named by file and line in CSV, by table in SQL.
    valid["invalid_ids"] = sorted(
        (r.patient_id or "", r.contact_id or "", r.portal_user_id or "")
        for r in snap.invalid if isinstance(r, InvalidRecord)
    )
    return valid


def _csv_records(op_dir: Path) -> tuple[list[Any], list[Any], list[Any]]:
    src = CsvOPSource(op_dir)
    keep = lambda it: [r for r in it if not isinstance(r, InvalidRecord)]  # noqa: E731
    return keep(src.patients()), keep(src.contacts()), keep(src.family_contacts())


def test_csv_sql_and_simulator_give_identical_snapshots(tmp_path: Path,
                                                       pg_database: str) -> None:
    generate_practice(tmp_path, patients=400, seed=5, now=NOW)
    op_dir, portal_dir = tmp_path / "op", tmp_path / "portal"
    csv_portal = CsvPortalSource(portal_dir)
    reference = read_snapshot(CsvOPSource(op_dir), csv_portal)

    simulator = Simulator(clock=SimClock(NOW))
    simulator.load_portal_dir(portal_dir, op_dir=op_dir)
    server, url = start_simulator(simulator)
    schema_db = pg_database
    try:
        with HttpPortal(url, None, page_size=97) as http:
            for url_ in (f"sqlite:///{tmp_path / 'op.sqlite'}", schema_db):
                engine = make_engine(url_)
                if url_.startswith("postgresql"):
                    with engine.begin() as conn:  # a fresh schema per run of this test
                        name = f"op_{uuid.uuid4().hex[:8]}"
                        conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
                    engine.dispose()
                    engine = sa.create_engine(
                        url_, connect_args={"options": f"-csearch_path={name}"}
                    )
                load_op_sql(engine, *_csv_records(op_dir))
                with SqlOPSource(engine) as op:
                    snap = read_snapshot(op, http)
                engine.dispose()
                ours, theirs = comparable(snap), comparable(reference)
                for key in ours:
                    if key == "invalid_ids":
                        continue  # bad CSV rows never reach SQL tables
                    assert ours[key] == theirs[key], f"{key} differs via {url_.split(':')[0]}"
    finally:
        server.shutdown()
        simulator.close()
    assert PG_ADMIN_URL  # the PostgreSQL fixture above must have run
