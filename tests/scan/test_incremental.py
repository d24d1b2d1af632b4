"""Incremental scans leave the same open findings as full scans (worker.scan.incremental).

A generated practice is scanned in full, the state database copied, ~20 random changes
are made to the sources (planted defects fixed, new ones made, `updated_at` touched), and
then one copy gets an incremental scan and the other a full one: the open findings must
be identical, state by state (`contact_duplicate` compared as groups: its detail carries
the match probability, which an incremental scan computes with the last full scan's
parameters). The same on CSV exports, SQLite and PostgreSQL, whose targeted reads
differ; on PostgreSQL sources the state databases are PostgreSQL too.

Duplicate groups in incremental scans (worker.scan.duplicate_index): one changed contact
costs a few contact rows read by id, not the contacts table; without a kept model the
whole matcher runs, as before, and says so.
"""

from __future__ import annotations

import csv
import random
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select

from config.settings import Settings
from tests.conftest import PG_ADMIN_URL
from worker.devtools.generator import generate_practice
from worker.model.records import Contact, FamilyContact, PortalUser
from worker.scan.engine import Deps, reconcile
from worker.scan.incremental import (
    FULL_SCAN_ONLY,
    WATERMARK,
    full_reconcile,
    incremental_reconcile,
    overlap,
)
from worker.scan.planner import Decision
from worker.sources.csv_source import CsvOPSource, CsvPortalSource
from worker.sources.layout import OP_LAYOUT, PORTAL_LAYOUT
from worker.sources.sql_source import (
    OP_METADATA,
    PORTAL_METADATA,
    SqlOPSource,
    SqlPortalSource,
    create_op_tables,
    create_portal_tables,
    load_table_sql,
)
from worker.state.db import kv_get, make_engine, migrate, session_factory
from worker.state.models import FindingRow, Run
from worker.state.models import FindingState as S

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PATIENTS = 1200
LAYOUT = {**OP_LAYOUT, **PORTAL_LAYOUT}
Tables = dict[str, list[dict[str, Any]]]
DELETED = "_deleted"


def live(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get(DELETED)]


@pytest.fixture(scope="module")
def practice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("practice")
    generate_practice(out, PATIENTS, seed=7, now=NOW)
    return out


def read_tables(practice: Path) -> Tables:
    tables: Tables = {}
    for table in LAYOUT:
        sub = "op" if table in OP_LAYOUT else "portal"
        with open(practice / sub / f"{table}.csv", encoding="utf-8", newline="") as handle:
            tables[table] = list(csv.DictReader(handle))
    return tables


class Store:
    """The practice's sources in one backend, rewritten after each batch of changes.

    CSV rows keep their lines (a bad row's finding is keyed by its line), new rows go at
    the end; SQL tables are reloaded.
    """

    def __init__(self, kind: str, root: Path, pg_url: str | None) -> None:
        self.kind = kind
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.engine: sa.Engine | None = None
        if kind == "sqlite":
            self.engine = sa.create_engine(f"sqlite:///{root / 'sources.sqlite'}")
        elif kind == "postgresql":
            assert pg_url is not None
            self.engine = sa.create_engine(pg_url)
        if self.engine is not None:
            create_op_tables(self.engine)
            create_portal_tables(self.engine)

    def write(self, tables: Tables) -> None:
        """A deleted row (marked `DELETED`) leaves a blank line in a CSV file, so the
        lines after it keep their numbers, and is left out of a SQL table."""
        if self.engine is None:
            for table, rows in tables.items():
                sub = self.root / ("op" if table in OP_LAYOUT else "portal")
                sub.mkdir(parents=True, exist_ok=True)
                with open(sub / f"{table}.csv", "w", encoding="utf-8", newline="") as handle:
                    writer = csv.DictWriter(handle, LAYOUT[table], lineterminator="\n")
                    writer.writeheader()
                    for row in rows:
                        if row.get(DELETED):
                            handle.write("\n")
                        else:
                            writer.writerow(row)
            return
        for table, rows in tables.items():
            with self.engine.begin() as conn:
                conn.execute(sa.text(f"DELETE FROM {table}"))
            load_table_sql(self.engine, table, [r for r in rows if not r.get(DELETED)])

    def readers(self) -> tuple[Any, Any]:
        if self.engine is None:
            return CsvOPSource(self.root / "op"), CsvPortalSource(self.root / "portal")
        return SqlOPSource(self.engine), SqlPortalSource(self.engine)

    def close(self) -> None:
        if self.engine is not None:
            if self.kind == "postgresql":
                OP_METADATA.drop_all(self.engine)
                PORTAL_METADATA.drop_all(self.engine)
            self.engine.dispose()


@pytest.fixture
def pg_databases() -> Iterator[Any]:
    """Fresh PostgreSQL databases for one test (sources, state), dropped after it."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    names: list[str] = []

    def create() -> str:
        name = f"oprecon_inc_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        names.append(name)
        return sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(False)

    try:
        yield create
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url(pg_databases: Any) -> str:
    """A fresh PostgreSQL database for one test (the targeted reads use arrays there)."""
    return str(pg_databases())


def state_deps(path: Path | str, settings: Settings, op: Any, portal: Any) -> Deps:
    """A migrated state DB: SQLite at `path`, or a database URL."""
    url = path if isinstance(path, str) else f"sqlite:///{path}"
    migrate(url)
    return Deps(settings.model_copy(update={"state_db_url": url}),
                session_factory(make_engine(url)), op, portal)


def open_findings(deps: Deps) -> set[tuple[str, str]]:
    with deps.sessions() as session:
        rows = session.scalars(select(FindingRow).where(FindingRow.state != S.RESOLVED))
        return {(r.fingerprint, r.state) for r in rows if r.check not in FULL_SCAN_ONLY}


# -- random changes ---------------------------------------------------------------------


def _stamp(rng: random.Random, base: datetime) -> str:
    """Between 1 and 28 minutes after the last scan: at the next one, 30 minutes after
    it, some are still within the propagation delay (cross-system checks wait)."""
    return (base + timedelta(minutes=rng.uniform(1, 28))).isoformat()


def delete(tables: Tables, rng: random.Random, kind: str) -> str:
    """Delete OP rows as staff do: a family-contact row, or a contact or a patient with
    all of their family-contact rows (a merge leaves the other record). Preferably one
    whose portal account still sees a child or is seen, so the link must be reported at
    once (caregiver_link_stale)."""
    cons, fcs = live(tables["contacts"]), live(tables["family_contacts"])
    linked = {u["op_contact_id"] for u in tables["portal_users"]
              if u["op_contact_id"] and u["active"] == "true"}
    if kind == "delete_patient":
        seen = {u["op_patient_id"] for u in tables["portal_users"]
                if u["op_patient_id"] and u["active"] == "true"}
        pats = live(tables["patients"])
        with_fc = {f["patient_id"] for f in fcs}
        candidates = [p for p in pats if p["patient_id"] in seen & with_fc] or pats
        gone = rng.choice(candidates)
        gone[DELETED] = True
        for f in fcs:
            if f["patient_id"] == gone["patient_id"]:
                f[DELETED] = True
    elif kind == "delete_fc":
        candidates = [f for f in fcs if f["contact_id"] in linked] or fcs
        rng.choice(candidates)[DELETED] = True
    else:
        with_fc = {f["contact_id"] for f in fcs}
        candidates = [c for c in cons if c["contact_id"] in linked & with_fc] or cons
        gone = rng.choice(candidates)
        gone[DELETED] = True
        for f in fcs:
            if f["contact_id"] == gone["contact_id"]:
                f[DELETED] = True
    return kind


def change(tables: Tables, rng: random.Random, base: datetime = NOW) -> str:
    """One random change of the kind staff make: fixing a planted defect or making one,
    or deleting a family-contact row or a contact.

    Not among them: re-pointing a portal user at another OP record, which incremental
    scans leave to the nightly full scan (worker.scan.incremental).
    """
    pats, cons = live(tables["patients"]), live(tables["contacts"])
    fcs = live(tables["family_contacts"])
    users, audit = tables["portal_users"], tables["portal_audit"]
    good = [r for r in pats if r["patient_id"].startswith("P") and r["dob"] != "2019-02-30"]
    kind = rng.choice([
        "patient_status", "patient_email", "contact_email", "contact_active", "authority",
        "self_role", "new_fc", "user_email", "user_role", "user_active", "welcome",
        "new_contact_for_orphan", "new_caregiver", "delete_fc", "delete_contact",
    ])
    when = _stamp(rng, base)
    if kind in ("delete_fc", "delete_contact"):
        return delete(tables, rng, kind)
    if kind == "patient_status":
        row = rng.choice(good)
        row["status"] = "Inactive" if row["status"] == "Active" else "Active"
        row["updated_at"] = when
    elif kind == "patient_email":
        row = rng.choice(good)
        row["email"] = "" if row["email"] not in ("", "N/A", "n/a", "NA") else "kid@example.org"
        row["updated_at"] = when
    elif kind == "contact_email":
        row = rng.choice(cons)
        row["email"] = rng.choice(["", "broken@@example.org", f"fixed{rng.randrange(10**6)}"
                                   "@example.net"])
        row["updated_at"] = when
    elif kind == "contact_active":
        row = rng.choice(cons)
        row["active"] = "false" if row["active"] == "true" else "true"
        row["updated_at"] = when
    elif kind == "authority":
        row = rng.choice(fcs)
        row["authority"] = "None" if row["authority"] in ("Joint", "Exclusive") else "Joint"
        row["updated_at"] = when
    elif kind == "self_role":
        row = rng.choice(fcs)
        row["role_reason"] = "Self"
        row["updated_at"] = when
    elif kind == "new_fc":
        tables["family_contacts"].append({"patient_id": rng.choice(good)["patient_id"],
                    "contact_id": rng.choice(cons)["contact_id"], "role_reason": "Father",
                    "authority": "Joint", "updated_at": when})
    elif kind == "new_caregiver":  # a parent registers: their portal account appears
        contact = rng.choice(cons)
        users.append({"user_id": f"UN{len(users)}", "op_patient_id": "",
                      "op_contact_id": contact["contact_id"], "first_name": "New",
                      "last_name": "User", "email": contact["email"], "role": "Caregiver",
                      "active": "true", "updated_at": when})
    elif kind in ("user_email", "user_role", "user_active"):
        row = rng.choice(users)
        if kind == "user_email":
            row["email"] = ("someone@example.com" if row["email"].lower().endswith("@dummy.com")
                            else "fixed@dummy.com")
        elif kind == "user_role":
            row["role"] = "Caregiver" if row["role"] == "Patient" else "Patient"
        else:
            row["active"] = "false" if row["active"] == "true" else "true"
        row["updated_at"] = when
    elif kind == "welcome":
        contact = rng.choice([c for c in cons if "@" in c["email"]])
        audit.append({"at": when, "action": "Profile: Welcome Mail Sent", "user_id": "",
                      "email": contact["email"].upper()})
    else:  # an OP contact appears for a portal user pointing at a missing one
        known = {c["contact_id"] for c in cons}
        dangling = [u for u in users if u["op_contact_id"] and u["op_contact_id"] not in known]
        if not dangling:
            return change(tables, rng, base)
        cid = rng.choice(dangling)["op_contact_id"]
        tables["contacts"].append({
            "contact_id": cid, "first_name": "New", "last_name": "Contact",
            "email": f"{cid.lower()}@example.org", "dob": "", "phone": "", "address": "",
            "city": "", "postcode": "", "active": "true", "patient_id": "", "updated_at": when,
        })
    return kind


# -- the equivalence ----------------------------------------------------------------------


@pytest.mark.services
@pytest.mark.parametrize("backend", ["csv", "sqlite", "postgresql"])
def test_incremental_matches_full_after_random_changes(
    backend: str, practice: Path, tmp_path: Path, make_settings: Any,
    request: pytest.FixtureRequest,
) -> None:
    """On PostgreSQL sources the state databases are PostgreSQL too."""
    create = request.getfixturevalue("pg_databases") if backend == "postgresql" else None
    store = Store(backend, tmp_path / "src", create() if create else None)
    states: list[Deps] = []
    try:
        tables = read_tables(practice)
        store.write(tables)
        settings = make_settings()
        op, portal = store.readers()
        inc = state_deps(create() if create else tmp_path / "inc.sqlite", settings, op, portal)
        states.append(inc)
        first = full_reconcile(inc, NOW)
        assert first.plan.items
        if create:
            full = state_deps(create(), settings, op, portal)
            states.append(full)
            full_reconcile(full, NOW)
        else:
            shutil.copy(tmp_path / "inc.sqlite", tmp_path / "full.sqlite")
            full = state_deps(tmp_path / "full.sqlite", settings, op, portal)
        assert open_findings(full) == open_findings(inc)

        rng = random.Random(f"changes-{backend}")
        kinds = [change(tables, rng) for _ in range(20)]
        kinds += [delete(tables, rng, k)
                  for k in ("delete_fc", "delete_contact", "delete_patient") * 2]
        store.write(tables)

        later = NOW + timedelta(minutes=30)
        result = incremental_reconcile(inc, later)
        full_reconcile(full, later)
        assert result.kind == "incremental" and not result.scope.is_all, kinds
        assert any("rows deleted since name" in line for line in result.trace)
        assert open_findings(inc) == open_findings(full), kinds
        # A much smaller read than the full one.
        assert result.counts["patients"] < PATIENTS // 2

        # Only deletions now (found by the row counts this time); the pending findings
        # of the last run come due.
        kinds = [delete(tables, rng, k)
                 for k in ("delete_fc", "delete_contact", "delete_patient")]
        store.write(tables)
        latest = later + timedelta(minutes=20)
        again = incremental_reconcile(inc, latest)
        full_reconcile(full, latest)
        assert any("rows deleted since name" in line for line in again.trace)
        assert open_findings(inc) == open_findings(full), kinds

        # Duplicate groups are decided by incremental scans too, as the full scan does.
        assert _open_duplicates(inc) and _open_duplicates(inc) == _open_duplicates(full)
        if hasattr(op, "close"):
            op.close()
            portal.close()
    finally:
        for deps in states:  # before their databases are dropped
            engine = deps.sessions.kw["bind"]
            engine.dispose()
        store.close()


# -- the watermark and the cheap run --------------------------------------------------------


def test_watermark_cheap_run_and_first_run(
    practice: Path, tmp_path: Path, make_settings: Any
) -> None:
    op, portal = CsvOPSource(practice / "op"), CsvPortalSource(practice / "portal")
    deps = state_deps(tmp_path / "s.sqlite", make_settings(), op, portal)

    # No watermark yet: the first incremental scan reads everything and sets one.
    first = incremental_reconcile(deps, NOW)
    assert first.kind == "incremental" and first.scope.is_all
    with deps.sessions() as session:
        mark = kv_get(session, "test", WATERMARK)
    assert mark is not None and mark["at"] == NOW.isoformat() and mark["patients"] >= PATIENTS

    # Confirm the pending findings (and those of records that were too recent at NOW),
    # then nothing is due and nothing changed: a cheap run.
    confirm = NOW + timedelta(minutes=20)
    incremental_reconcile(deps, confirm)
    confirm += timedelta(minutes=20)
    incremental_reconcile(deps, confirm)
    quiet = confirm + timedelta(minutes=40)
    assert quiet - overlap(deps.settings) > confirm
    cheap = incremental_reconcile(deps, quiet)
    assert cheap.scope.label == "entities:nothing changed"
    assert cheap.counts == {} and not cheap.plan.items
    with deps.sessions() as session:
        run = session.get(Run, cheap.run_id)
        assert run is not None and run.status == "succeeded" and run.kind == "incremental"
        assert kv_get(session, "test", WATERMARK)["at"] == quiet.isoformat()
        assert kv_get(session, "test", "last_success")["kind"] == "incremental"


def test_full_scan_through_the_service_sets_the_watermark(
    practice: Path, tmp_path: Path, make_settings: Any, redis_client: Any
) -> None:
    from worker.runtime.service import scan

    settings = make_settings(op_dir=practice / "op", portal_dir=practice / "portal")
    deps = state_deps(tmp_path / "s.sqlite", settings,
                      CsvOPSource(practice / "op"), CsvPortalSource(practice / "portal"))
    outcome = scan(deps.settings, "full", deps=deps, now=NOW)
    assert outcome.status == "succeeded"
    with deps.sessions() as session:
        assert kv_get(session, "test", WATERMARK)["run_id"] == outcome.result.run_id
    outcome = scan(deps.settings, "incremental", deps=deps, now=NOW + timedelta(minutes=20))
    assert outcome.result is not None and outcome.result.kind == "incremental"
    assert not outcome.result.scope.is_all


# -- targeted reads ---------------------------------------------------------------------------


@pytest.mark.parametrize("many", [False, True])
def test_targeted_reads_match_a_filtered_full_read(
    practice: Path, tmp_path: Path, many: bool
) -> None:
    """SQLite answers a few ids with IN and many (past its variable limit) by filtering a
    stream; both, and the CSV pass, must give exactly the rows a full read filtered gives."""
    tables = read_tables(practice)
    csv_store = Store("csv", tmp_path / "csv", None)
    sql_store = Store("sqlite", tmp_path, None)
    csv_store.write(tables)
    sql_store.write(tables)
    csv_op, _ = csv_store.readers()
    sql_op, sql_portal = sql_store.readers()
    rng = random.Random(3)
    full_fcs = [f for f in csv_op.family_contacts() if isinstance(f, FamilyContact)]
    contacts = [c for c in csv_op.contacts() if isinstance(c, Contact)]
    size = 1000 if many else 40
    pids = {f.patient_id for f in rng.sample(full_fcs, size)}
    cids = {c.contact_id for c in rng.sample(contacts, size)}
    want = sorted((f.patient_id, f.contact_id) for f in full_fcs
                  if f.patient_id in pids or f.contact_id in cids)
    for reader in (csv_op, sql_op):
        got = sorted((f.patient_id, f.contact_id) for f in
                     reader.select_family_contacts(patient_ids=pids, contact_ids=cids)
                     if isinstance(f, FamilyContact))
        assert got == want
    emails = {c.email.strip().lower() for c in rng.sample(contacts, 5) if c.email.strip()}
    by_email = sorted(c.contact_id for c in sql_op.select_contacts(emails=emails)
                      if isinstance(c, Contact))
    assert by_email == sorted(c.contact_id for c in contacts
                              if c.email.strip().lower() in emails)
    users = [u for u in sql_portal.users() if isinstance(u, PortalUser)]
    uids = {u.user_id for u in rng.sample(users, size)}
    assert sorted(u.user_id for u in sql_portal.select_users(ids=uids)
                  if isinstance(u, PortalUser)) == sorted(uids)
    sql_op.close()
    sql_portal.close()
    sql_store.close()


def test_incremental_scan_decides_a_changed_contacts_duplicate_group(
    practice: Path, tmp_path: Path, make_settings: Any
) -> None:
    """A duplicate group whose record is corrected to another person is resolved by the
    next incremental scan (it compares the changed contact with every contact); a new
    re-registration is raised by it; groups of unchanged contacts are left alone."""
    tables = read_tables(practice)
    store = Store("csv", tmp_path / "src", None)
    store.write(tables)
    op, portal = store.readers()
    deps = state_deps(tmp_path / "s.sqlite", make_settings(), op, portal)
    full_reconcile(deps, NOW)
    with deps.sessions() as session:
        groups = session.scalars(select(FindingRow).where(
            FindingRow.check == "contact_duplicate")).all()
    assert len(groups) >= 2
    group, other = groups[0], groups[1]
    changed = (NOW + timedelta(minutes=1)).isoformat()
    for row in tables["contacts"]:
        if row["contact_id"] in group.contact_ids[1:]:  # staff corrected it: someone else
            row.update(first_name="Quentin", last_name="Abernathy-Voss", dob="1949-02-03",
                       email="qav@example.net", phone="207-555-0188",
                       address="1 Lighthouse Rd", postcode="04101", updated_at=changed)
    original = next(r for r in tables["contacts"] if r["contact_id"] == other.contact_ids[0])
    copy = dict(original, contact_id="C9999999", first_name=original["first_name"].upper(),
                updated_at=changed)  # a re-registration typed in capitals
    tables["contacts"].append(copy)
    store.write(tables)
    result = incremental_reconcile(deps, NOW + timedelta(minutes=30))
    assert "contact_duplicate" not in result.scope.exclude_checks
    with deps.sessions() as session:
        assert session.get(FindingRow, group.id).state == S.RESOLVED
        rows = session.scalars(select(FindingRow).where(
            FindingRow.check == "contact_duplicate")).all()
        grown = [r for r in rows if "C9999999" in (r.contact_ids or ())]
        assert grown and set(other.contact_ids) <= set(grown[0].contact_ids)
        untouched = [r for r in groups[2:] if session.get(FindingRow, r.id).state != S.OPEN]
        assert untouched == []
    # The nightly full scan agrees.
    before = _open_duplicates(deps)
    reconcile(deps, kind="full", now=NOW + timedelta(minutes=40))
    assert _open_duplicates(deps) == before


class CountingOP:
    """An OP source that counts the contact rows it hands out, however asked."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.contact_rows = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _count(self, rows: Iterator[Any]) -> Iterator[Any]:
        for row in rows:
            self.contact_rows += 1
            yield row

    def contacts(self, since: datetime | None = None) -> Iterator[Any]:
        return self._count(self.inner.contacts(since))

    def select_contacts(self, **ids: Any) -> Iterator[Any]:
        return self._count(self.inner.select_contacts(**ids))

    def read_changed(self, table: str, since: datetime) -> Iterator[Any]:
        rows = self.inner.read_changed(table, since)
        return self._count(rows) if table == "contacts" else rows


def _duplicate_rows(deps: Any) -> list[FindingRow]:
    with deps.sessions() as session:
        return list(session.scalars(select(FindingRow).where(
            FindingRow.check == "contact_duplicate")))


def _one_changed_contact(
    practice: Path, tmp_path: Path, make_settings: Any
) -> tuple[Tables, Store, CountingOP, Deps]:
    tables = read_tables(practice)
    store = Store("csv", tmp_path / "src", None)
    store.write(tables)
    op, portal = store.readers()
    counting = CountingOP(op)
    deps = state_deps(tmp_path / "s.sqlite", make_settings(), counting, portal)
    full_reconcile(deps, NOW)
    # Settle what the generator changed just before NOW and confirm the pending findings
    # (test_watermark_cheap_run_and_first_run): then only the test's changes are new.
    incremental_reconcile(deps, NOW + timedelta(minutes=20))
    incremental_reconcile(deps, QUIET - timedelta(minutes=20))
    return tables, store, counting, deps


QUIET = NOW + timedelta(minutes=60)


def test_one_changed_contact_reads_its_candidates_not_the_practice(
    practice: Path, tmp_path: Path, make_settings: Any
) -> None:
    """With what the full scan kept (its parameters, every contact's blocking keys), an
    incremental scan in which one contact changed reads that contact and its candidates
    by id: a re-registration of an unchanged parent is raised, and a group whose record
    staff corrected to someone else is resolved, each from a few dozen contact rows."""
    tables, store, op, deps = _one_changed_contact(practice, tmp_path, make_settings)
    contacts = len(live(tables["contacts"]))
    pairs = [r for r in _duplicate_rows(deps) if len(r.contact_ids or ()) == 2]
    grouped = {c for r in _duplicate_rows(deps) for c in r.contact_ids or ()}
    parent = next(r for r in tables["contacts"] if r["contact_id"] not in grouped
                  and "@" in r["email"] and r["dob"] and r["active"] == "true")

    # A re-registration of an unchanged contact (typed in capitals, a new phone).
    tables["contacts"].append(dict(parent, contact_id="C9999999", phone="",
                                   first_name=parent["first_name"].upper(),
                                   updated_at=(QUIET + timedelta(minutes=1)).isoformat()))
    store.write(tables)
    op.contact_rows = 0
    first = incremental_reconcile(deps, QUIET + timedelta(minutes=30))
    assert any("through the kept blocking keys" in line for line in first.trace)
    assert op.contact_rows < 25 < contacts, op.contact_rows
    raised = [r for r in _duplicate_rows(deps) if "C9999999" in (r.contact_ids or ())]
    assert [(tuple(r.contact_ids), r.state) for r in raised] == [
        (tuple(sorted([parent["contact_id"], "C9999999"])), S.OPEN)]

    # Staff correct one record of a pair: it was someone else all along.
    group = pairs[0]
    for row in tables["contacts"]:
        if row["contact_id"] == group.contact_ids[1]:
            row.update(first_name="Quentin", last_name="Abernathy-Voss", dob="1949-02-03",
                       email="qav@example.net", phone="207-555-0188",
                       address="1 Lighthouse Rd", postcode="04101",
                       updated_at=(QUIET + timedelta(minutes=31)).isoformat())
    store.write(tables)
    op.contact_rows = 0
    incremental_reconcile(deps, QUIET + timedelta(minutes=60))
    assert op.contact_rows < 25, op.contact_rows
    with deps.sessions() as session:
        assert session.get(FindingRow, group.id).state == S.RESOLVED
    # The nightly full scan agrees with both.
    before = _open_duplicates(deps)
    op.contact_rows = 0
    full_reconcile(deps, QUIET + timedelta(minutes=70))
    assert op.contact_rows >= contacts
    assert _open_duplicates(deps) == before


@pytest.mark.parametrize("why", ["no model kept", "a scan kept no keys", "a bulk change"])
def test_without_a_kept_model_the_whole_matcher_runs_and_says_so(
    why: str, practice: Path, tmp_path: Path, make_settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A state DB from before the kept index (or a full scan that kept none: a sharded
    one) makes the next incremental scan read every contact and run the whole matcher,
    as before, and say so; it keeps what it learned, so the scan after is cheap again.
    So does a bulk change (here: any change, with the bulk threshold lowered)."""
    from structlog.testing import capture_logs

    from worker.scan import duplicate_index
    from worker.state.models import DuplicateIndex

    tables, store, op, deps = _one_changed_contact(practice, tmp_path, make_settings)
    with deps.sessions() as session, session.begin():
        if why == "no model kept":
            session.execute(sa.delete(DuplicateIndex))
        elif why == "a bulk change":
            monkeypatch.setattr(duplicate_index, "MIN_BULK", 0)
            monkeypatch.setattr(duplicate_index, "BULK_SHARE", 0.0)
        else:  # the watermark moved on without the kept keys
            mark = kv_get(session, "test", WATERMARK)
            from worker.state.db import kv_set
            kv_set(session, "test", WATERMARK, {**mark, "at": (QUIET + timedelta(
                minutes=5)).isoformat()}, QUIET)
    group = _duplicate_rows(deps)[0]
    parent = next(r for r in tables["contacts"] if r["contact_id"] == group.contact_ids[0])
    tables["contacts"].append(dict(parent, contact_id="C9999999", phone="",
                                   updated_at=(QUIET + timedelta(minutes=6)).isoformat()))
    store.write(tables)
    op.contact_rows = 0
    with capture_logs() as logs:
        result = incremental_reconcile(deps, QUIET + timedelta(minutes=30))
    [fallback] = [e for e in logs if e["event"] == "duplicates_whole_rerun"]
    assert {"no model kept": "no model learned", "a scan kept no keys": "miss changes",
            "a bulk change": "a bulk change"}[why] in fallback["reason"]
    assert any("the whole matcher ran" in line for line in result.trace)
    assert op.contact_rows >= len(live(tables["contacts"]))
    grown = [r for r in _duplicate_rows(deps) if "C9999999" in (r.contact_ids or ())]
    assert grown and set(group.contact_ids) < set(grown[0].contact_ids)

    # What it learned is kept: the next scan with a changed contact is cheap again.
    monkeypatch.undo()
    tables["contacts"][-1]["first_name"] = parent["first_name"].upper()
    tables["contacts"][-1]["updated_at"] = (QUIET + timedelta(minutes=31)).isoformat()
    store.write(tables)
    op.contact_rows = 0
    again = incremental_reconcile(deps, QUIET + timedelta(minutes=60))
    assert any("through the kept blocking keys" in line for line in again.trace)
    assert op.contact_rows < 60


def _open_duplicates(deps: Any) -> set[tuple[str, ...]]:
    with deps.sessions() as session:
        return {tuple(r.contact_ids) for r in session.scalars(select(FindingRow).where(
            FindingRow.check == "contact_duplicate")) if r.state != S.RESOLVED}


# -- deletions ----------------------------------------------------------------------------


def test_a_deleted_contact_still_linked_is_caught_by_the_next_incremental_scan(
    tmp_path: Path, make_settings: Any
) -> None:
    """Staff delete a parent's contact record (and with it the family-contact row) while
    the portal still shows the child to that parent's account. That is the privacy
    problem of a stale link: the next incremental scans, not the nightly full one, raise
    caregiver_link_stale (high, an immediate notice) once the portal had its delay."""
    from factory import caregiver, contact, fc, link, patient, patient_user, source

    from worker.digest.build import immediate_notices
    from worker.sources.csv_source import write_op_csv, write_portal_csv

    def write(contacts: list[Any], fcs: list[Any]) -> None:
        write_op_csv(tmp_path / "op", [patient("P1"), patient("P2")], contacts, fcs)

    write([contact("C1"), contact("C2")], [fc("P1", "C1"), fc("P1", "C2"), fc("P2", "C2")])
    write_portal_csv(tmp_path / "portal",
                     [caregiver("U1", "C1"), caregiver("U3", "C2"), patient_user("U2", "P1"),
                      patient_user("U4", "P2")],
                     [link("U1", "U2"), link("U3", "U2"), link("U3", "U4")],
                     [source("U1"), source("U3")], [])
    deps = state_deps(tmp_path / "s.sqlite", make_settings(),
                      CsvOPSource(tmp_path / "op"), CsvPortalSource(tmp_path / "portal"))
    assert not full_reconcile(deps, NOW).plan.items

    # The first incremental scan after a full one reads the ids once (a full scan keeps
    # its snapshot's ids but knows no row counts); later ones only count rows.
    settle = incremental_reconcile(deps, NOW + timedelta(seconds=10))
    assert any("id columns were read" in line for line in settle.trace)
    # A new contact and family-contact row: the counts agree, no id column is read.
    write([contact("C1"), contact("C2"), contact("C3", updated_at=NOW)],
          [fc("P1", "C1"), fc("P1", "C2"), fc("P2", "C2"), fc("P2", "C3", updated_at=NOW)])
    quiet = incremental_reconcile(deps, NOW + timedelta(seconds=30))
    assert not any("id columns were read" in line for line in quiet.trace)

    write([contact("C2"), contact("C3", updated_at=NOW)],  # C1 deleted in OP, with its row
          [fc("P1", "C2"), fc("P2", "C2"), fc("P2", "C3", updated_at=NOW)])
    first = incremental_reconcile(deps, NOW + timedelta(minutes=1))
    assert any("id columns were read" in line and "1 contact(s)" in line
               for line in first.trace)
    assert "C1" in first.scope.contact_ids
    stale = {i.finding.fingerprint: i for i in first.plan.items
             if i.finding.check == "caregiver_link_stale"}
    [item] = stale.values()
    f = item.finding
    assert (f.patient_id, f.contact_id, f.portal_user_id) == ("P1", "C1", "U1")
    assert str(f.severity) == "high" and "no longer exists" in f.detail
    assert item.decision is Decision.WAIT  # cross-system: confirmed by a later read

    confirm = NOW + timedelta(minutes=17)
    second = incremental_reconcile(deps, confirm)
    [again] = [i for i in second.plan.items if i.finding.check == "caregiver_link_stale"]
    assert again.immediate and again.decision in (Decision.FIX, Decision.ALERT)
    with deps.sessions() as session:
        notices = immediate_notices(session, deps.settings, confirm)
    assert any(n.window_key.startswith(f"immediate:{f.fingerprint}:") for n in notices)


def test_a_deleted_patient_still_linked_is_caught_by_the_next_incremental_scan(
    tmp_path: Path, make_settings: Any
) -> None:
    """Staff delete (or merge away) a child's chart while the portal still links the
    parent to the child's account: OP authorizes nobody for a chart it no longer has, so
    the link is stale, as for a deleted contact. The next incremental scan raises it
    (high, immediate notice) after the portal's delay, besides the orphaned account."""
    from factory import caregiver, contact, fc, link, patient, patient_user, source

    from worker.digest.build import immediate_notices
    from worker.sources.csv_source import write_op_csv, write_portal_csv

    write_portal_csv(tmp_path / "portal",
                     [caregiver("U1", "C1"), patient_user("U2", "P1"),
                      patient_user("U4", "P2")],
                     [link("U1", "U2"), link("U1", "U4")], [source("U1")], [])
    write_op_csv(tmp_path / "op", [patient("P1"), patient("P2")], [contact("C1")],
                 [fc("P1", "C1"), fc("P2", "C1")])
    deps = state_deps(tmp_path / "s.sqlite", make_settings(),
                      CsvOPSource(tmp_path / "op"), CsvPortalSource(tmp_path / "portal"))
    assert not full_reconcile(deps, NOW).plan.items
    incremental_reconcile(deps, NOW + timedelta(seconds=10))

    write_op_csv(tmp_path / "op", [patient("P1")], [contact("C1")], [fc("P1", "C1")])
    first = incremental_reconcile(deps, NOW + timedelta(minutes=1))
    assert "P2" in first.scope.patient_ids
    by_check = {i.finding.check: i for i in first.plan.items}
    assert set(by_check) == {"caregiver_link_stale", "portal_orphan_user"}
    f = by_check["caregiver_link_stale"].finding
    assert (f.patient_id, f.contact_id, f.portal_user_id) == ("P2", "C1", "U1")
    assert str(f.severity) == "high" and "OP patient P2 no longer exists" in f.detail

    confirm = NOW + timedelta(minutes=17)
    second = incremental_reconcile(deps, confirm)
    [again] = [i for i in second.plan.items if i.finding.check == "caregiver_link_stale"]
    # The fix is the parent's source refresh (read-only exports: staff apply it).
    assert again.immediate and again.decision in (Decision.FIX, Decision.ALERT)
    assert again.finding.fix is not None and str(again.finding.fix) == "refresh_source"
    with deps.sessions() as session:
        notices = immediate_notices(session, deps.settings, confirm)
    assert any(n.window_key.startswith(f"immediate:{f.fingerprint}:") for n in notices)


def test_an_incremental_scan_holds_back_a_fix_for_a_blocker_outside_its_scope(
    tmp_path: Path, make_settings: Any
) -> None:
    """Root cause first must not depend on what a run happened to read: a parent's portal
    account changes, so their missing link is re-decided; the chart's other contact is
    inactive (a blocker on the same chart, outside this run's scope). The incremental
    scan waits for it exactly as a full scan does."""
    from factory import caregiver, contact, fc, patient, patient_user, source

    from worker.sources.csv_source import write_op_csv, write_portal_csv

    write_op_csv(tmp_path / "op", [patient("P1")], [contact("C1"), contact("C9", active=False)],
                 [fc("P1", "C1"), fc("P1", "C9", role="Father")])

    def portal(email: str, at: datetime) -> None:
        write_portal_csv(tmp_path / "portal",
                         [caregiver("U1", "C1", email=email, updated_at=at),
                          patient_user("U2", "P1")], [], [source("U1")], [])

    portal("c1@example.org", datetime(2026, 1, 1, tzinfo=UTC))
    deps = state_deps(tmp_path / "s.sqlite", make_settings(),
                      CsvOPSource(tmp_path / "op"), CsvPortalSource(tmp_path / "portal"))
    full_reconcile(deps, NOW)
    full = full_reconcile(deps, NOW + timedelta(minutes=20))
    want = {i.finding.check: i.decision for i in full.plan.items}
    assert want["caregiver_link_missing"] is Decision.WAIT

    portal("c1.new@example.org", NOW + timedelta(minutes=21))
    inc = incremental_reconcile(deps, NOW + timedelta(minutes=40))
    assert "U1" in inc.scope.user_ids and "P1" not in inc.scope.patient_ids
    [link] = [i for i in inc.plan.items if i.finding.check == "caregiver_link_missing"]
    assert link.decision is Decision.WAIT
    assert "root cause first: contact_inactive (chart P1, contact C9)" in link.reason
