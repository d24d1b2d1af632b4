"""SQL adapters on real SQLite files and a real PostgreSQL: the same practice read from
CSV, SQLite and PostgreSQL gives identical snapshots, and bad values follow the CSV rules.

PostgreSQL must be reachable: a test that cannot connect fails, it never skips."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from tests.sources.test_sources_csv import (
    T0,
    contents,
    expected_snapshot,
    read_all,
    sample_practice,
    write_practice,
)
from worker.model.records import InvalidRecord, Patient, PortalUser
from worker.sources.base import OPReader, PortalReader, PortalWriter, ReadOnlyPortal, SourceError
from worker.sources.csv_source import CsvOPSource, CsvPortalSource
from worker.sources.sql_source import (
    SqlOPSource,
    SqlPortalSource,
    create_op_tables,
    load_op_sql,
    load_portal_sql,
)

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

pytestmark = pytest.mark.services


def hidden(n: int) -> str:
    """How a bad value that holds a word is described instead of quoted (a name
    shifted into the column must not be repeated)."""
    return f"[{n} characters not shown: a word here may be a name from another column]"


@pytest.fixture(scope="module")
def pg_admin() -> Iterator[Engine]:
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:  # fails the tests when PostgreSQL is down
        conn.execute(text("select 1"))
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine(pg_admin: Engine) -> Iterator[Engine]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"oprecon_src_{uuid.uuid4().hex[:12]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = create_engine(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    try:
        yield engine
    finally:
        engine.dispose()
        with pg_admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'src.sqlite'}")
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Engine:
    name = "sqlite_engine" if request.param == "sqlite" else "pg_engine"
    return request.getfixturevalue(name)


def load_practice(engine: Engine, practice: dict[str, list[Any]]) -> None:
    load_op_sql(engine, practice["patients"], practice["contacts"], practice["family_contacts"])
    load_portal_sql(engine, practice["users"], practice["links"], practice["sources"],
                    practice["audit"])


def read_sql(engine: Engine) -> Any:
    return read_all(SqlOPSource(engine), SqlPortalSource(engine))


# Rows that break a rule in ways both a file and a TEXT column can hold.
BAD_ROWS: dict[str, list[dict[str, str]]] = {
    "patients": [{"patient_id": "P9", "dob": "2019-02-30", "status": "Active"}],
    "contacts": [{"contact_id": "C9", "active": "maybe"}],
    "family_contacts": [{"patient_id": "P1", "contact_id": "C9", "authority": "Shared"},
                        {"contact_id": "C8", "authority": "Joint"}],
    "users": [{"user_id": "U9", "active": "", "op_patient_id": "P9"}],
}


def test_csv_sqlite_and_postgresql_agree(
    tmp_path: Path, sqlite_engine: Engine, pg_engine: Engine
) -> None:
    practice = sample_practice()
    with_bad = {k: v + BAD_ROWS.get(k, []) for k, v in practice.items()}
    op_dir, portal_dir = write_practice(tmp_path, with_bad)
    load_practice(sqlite_engine, with_bad)
    load_practice(pg_engine, with_bad)

    from_csv = contents(read_all(CsvOPSource(op_dir), CsvPortalSource(portal_dir)))
    from_sqlite = contents(read_sql(sqlite_engine))
    from_pg = contents(read_sql(pg_engine))

    assert from_sqlite == from_csv
    assert from_pg == from_csv
    wanted = contents(expected_snapshot(practice))
    assert {k: v for k, v in from_csv.items() if k != "invalid"} == {
        k: v for k, v in wanted.items() if k != "invalid"
    }
    assert from_csv["invalid"] == sorted([
        ("bad dob (not a valid YYYY-MM-DD date)", "P9", None, None),
        (f"bad active {hidden(5)}", None, "C9", None),
        (f"unknown authority {hidden(6)}", "P1", "C9", None),
        ("missing patient_id", None, "C8", None),
        ("missing active", "P9", None, "U9"),
    ])


def test_sql_invalid_rows_name_table_and_row(engine: Engine) -> None:
    practice = sample_practice()
    load_op_sql(engine, practice["patients"] + BAD_ROWS["patients"], [], [])
    good, bad = [], []
    for r in SqlOPSource(engine).patients():
        (bad if isinstance(r, InvalidRecord) else good).append(r)
    assert sorted(p.patient_id for p in good) == ["P1", "P2", "P3"]
    # Rows come in id order: P9 is the fourth.
    assert [(b.source, b.line, b.patient_id) for b in bad] == [("patients", 4, "P9")]


def test_since_filters_sql(engine: Engine) -> None:
    load_practice(engine, sample_practice())
    op, portal = SqlOPSource(engine), SqlPortalSource(engine)
    assert sorted(p.patient_id for p in op.patients(T0)) == ["P1", "P2", "P3"]
    assert sorted(p.patient_id for p in op.patients(T0 + timedelta(hours=1))) == ["P2", "P3"]
    # P2 changed at 08:30-05:00 = 13:30 UTC: only a store that kept the offset gets this.
    may2 = datetime(2024, 5, 2, tzinfo=UTC)
    assert sorted(p.patient_id for p in op.patients(may2 + timedelta(hours=13))) == ["P2", "P3"]
    assert sorted(p.patient_id for p in op.patients(may2 + timedelta(hours=13, minutes=31))) == [
        "P3"
    ]
    assert sorted(c.contact_id for c in op.contacts(T0)) == ["C1", "C2"]
    assert sorted(c.contact_id for c in op.contacts(T0 + timedelta(microseconds=123457))) == [
        "C2"
    ]
    assert sorted((f.patient_id, f.contact_id) for f in op.family_contacts(T0)) == [
        ("P1", "C1"), ("P1", "C3"), ("P2", "C2")
    ]
    assert sorted(u.user_id for u in portal.users(T0)) == ["U1", "U2"]
    assert sorted(a.at for a in portal.audit(T0 + timedelta(hours=1))) == [
        T0 + timedelta(days=1, hours=3), datetime(2024, 5, 2, 22, 0, tzinfo=UTC)
    ]
    assert sorted(u.user_id for u in portal.users(datetime(2024, 5, 1, 12, 0))) == ["U1", "U2"]


def test_sql_portal_is_read_only_but_reads_one_user(engine: Engine) -> None:
    load_practice(engine, sample_practice())
    portal = SqlPortalSource(engine)
    assert isinstance(SqlOPSource(engine), OPReader)
    assert isinstance(portal, PortalReader) and isinstance(portal, PortalWriter)
    assert portal.writable is False
    assert portal.get_user("U3") == sample_practice()["users"][2]
    assert portal.get_user("missing") is None
    with pytest.raises(ReadOnlyPortal):
        portal.set_user_email("U2", "a@dummy.com", "k")
    with pytest.raises(ReadOnlyPortal):
        portal.refresh_source("U1", "k")
    with pytest.raises(ReadOnlyPortal):
        portal.resend_welcome("C1", "carla@example.com", "k")


def test_missing_table_is_a_one_line_source_error(engine: Engine) -> None:
    create_op_tables(engine)
    with pytest.raises(SourceError) as err:
        list(SqlPortalSource(engine).users())
    message = str(err.value)
    assert message.startswith("cannot read portal_users from portal database ")
    assert "\n" not in message


def test_unreachable_database_is_a_source_error() -> None:
    source = SqlOPSource("postgresql://postgres:s3cret@127.0.0.1:1/none")
    try:
        with pytest.raises(SourceError) as err:
            list(source.patients())
    finally:
        source.close()
    assert "s3cret" not in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("cannot read patients from OP database postgresql+psycopg://")


def test_bad_url_is_a_source_error() -> None:
    with pytest.raises(SourceError, match="bad database URL"):
        SqlOPSource("not a url")


def test_native_column_types_read_like_text(pg_engine: Engine) -> None:
    """An OP database with its own types (ints, dates, booleans) reads the same."""
    with pg_engine.begin() as conn:
        conn.execute(text(
            "CREATE TABLE patients (patient_id integer, first_name text, last_name text,"
            " dob date, email text, status varchar(20), updated_at timestamp, extra text)"
        ))
        conn.execute(text(
            "CREATE TABLE contacts (contact_id bigint, first_name text, last_name text,"
            " email text, dob date, phone text, address text, city text, postcode text,"
            " active boolean, patient_id integer, updated_at timestamptz)"
        ))
        conn.execute(text(
            "INSERT INTO patients VALUES (7, 'Ada', 'L', '2015-03-04', NULL, 'active',"
            " '2024-05-01 12:00:00', 'ignored')"
        ))
        conn.execute(text(
            "INSERT INTO contacts VALUES (70, 'Mo', 'L', 'mo@example.com', NULL, NULL, NULL,"
            " NULL, NULL, true, 7, '2024-05-01 14:00:00+02')"
        ))
    op = SqlOPSource(pg_engine)
    assert list(op.patients()) == [Patient("7", "Ada", "L", date(2015, 3, 4), "", "Active", T0)]
    (contact,) = op.contacts()
    assert (contact.contact_id, contact.active, contact.patient_id, contact.updated_at) == (
        "70", True, "7", T0
    )


def test_load_rejects_foreign_records(sqlite_engine: Engine) -> None:
    with pytest.raises(TypeError, match="does not belong"):
        load_op_sql(sqlite_engine, sample_practice()["users"], [], [])


def test_url_string_and_engine_both_work(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'u.sqlite'}"
    engine = create_engine(url)
    try:
        load_practice(engine, sample_practice())
    finally:
        engine.dispose()
    with SqlPortalSource(url) as portal:
        users = [u for u in portal.users() if isinstance(u, PortalUser)]
    assert [u.user_id for u in users] == ["U1", "U2", "U3"]

