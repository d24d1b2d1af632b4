"""Metamorphic drill: damage one family's rows, and only that family may change.

No expected findings come from the generator's manifest. The practice is the demo
practice shipped with oprecon; the test picks one family (a patient, the contacts on
their chart, those contacts' other charts, and every portal user and link of them) and
damages its rows in ways hypothesis chooses: blank or over-long ids, ids that are paths,
control characters, bytes that are not UTF-8, typos in strict values, dates in another
format, times without an offset, stray quotes, extra fields. The family's rows are moved
to the end of each file in both runs, so a stray quote can swallow only its own family.

Then, on SQLite and on PostgreSQL state databases:
- the run completes;
- every finding about another family is exactly a finding of the undamaged run (and all
  of them are there, unless a damaged row named no id at all: then the file is *blind*
  and only conclusions drawn from a missing row of it may be withheld);
- the damaged family gets an `invalid_record` when a damaged value must be unreadable;
- no finding about the family compares it with the portal unless the undamaged run made
  the same comparison: nothing is concluded from what could not be read.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.settings import load_settings
from tests.conftest import BROKER_URL, REDIS_URL, _throwaway_database
from worker.checks.catalog import BY_ID
from worker.devtools import demo
from worker.model.findings import Finding
from worker.scan.engine import Deps, read_snapshot, reconcile
from worker.sources.csv_source import CsvOPSource, CsvPortalSource
from worker.sources.layout import OP_LAYOUT, PORTAL_LAYOUT
from worker.state.db import make_engine, migrate, session_factory

NOW = datetime(2026, 11, 2, 14, 0, tzinfo=UTC)
LAYOUT = {**OP_LAYOUT, **PORTAL_LAYOUT}
DIRS = {t: "op" for t in OP_LAYOUT} | {t: "portal" for t in PORTAL_LAYOUT}
# Conclusions drawn from a row's absence: the only ones a blind file may withhold.
ABSENCE_CHECKS = {"portal_orphan_user", "caregiver_link_stale", "caregiver_link_missing",
                  "welcome_not_sent", "self_dependent_missing", "invalid_record"}

REQUIRED_IDS = {("patients", "patient_id"), ("contacts", "contact_id"),
                ("family_contacts", "patient_id"), ("family_contacts", "contact_id"),
                ("portal_users", "user_id"), ("portal_links", "caregiver_user_id"),
                ("portal_links", "dependent_user_id"), ("portal_sources", "user_id")}
OPTIONAL_IDS = {("contacts", "patient_id"), ("portal_users", "op_patient_id"),
                ("portal_users", "op_contact_id")}
TIMES = {"updated_at", "created_at", "last_sync_at", "at"}
STRICT = {"status", "active", "authority", "dob"} | TIMES
TYPOS = {"status": "Actve", "active": "ture", "authority": "Jiont", "dob": "2019-02-30"}
CONTROLS = ["\x00", "\x1b[2J", "\x07", "\x7f", "\x85", "\u202e"]


def _demo_dir() -> Path:
    return Path(demo.__file__).parent / "demo_practice"


def _read(root: Path) -> dict[str, list[dict[str, str]]]:
    out = {}
    for table, sub in DIRS.items():
        with (root / sub / f"{table}.csv").open(newline="", encoding="utf-8") as fh:
            out[table] = list(csv.DictReader(fh))
    return out


@dataclass
class Family:
    patients: set[str]
    contacts: set[str]
    users: set[str]

    def ids(self) -> set[str]:
        return self.patients | self.contacts | self.users

    def owns(self, table: str, row: dict[str, str]) -> bool:
        cols = {"patients": ("patient_id",), "contacts": ("contact_id", "patient_id"),
                "family_contacts": ("patient_id", "contact_id"),
                "portal_users": ("user_id", "op_patient_id", "op_contact_id"),
                "portal_links": ("caregiver_user_id", "dependent_user_id"),
                "portal_sources": ("user_id",), "portal_audit": ("user_id",)}[table]
        return any(row.get(c) and row[c] in self.ids() for c in cols)


def _family(tables: dict[str, list[dict[str, str]]]) -> Family:
    """The smallest closed family with a caregiver, a linked dependent and an
    authorized contact: one whose damage could be mistaken for a stale link."""
    fcs = tables["family_contacts"]
    users = tables["portal_users"]
    best: Family | None = None
    for start in sorted({r["patient_id"] for r in fcs}):
        patients, contacts = {start}, set()
        for _ in range(4):  # grow to closure: charts <-> contacts, contacts as patients
            contacts |= {r["contact_id"] for r in fcs if r["patient_id"] in patients}
            patients |= {r["patient_id"] for r in fcs if r["contact_id"] in contacts}
            patients |= {r["patient_id"] for r in tables["contacts"]
                         if r["contact_id"] in contacts and r["patient_id"]}
        ids = {u["user_id"] for u in users
               if u["op_patient_id"] in patients or u["op_contact_id"] in contacts}
        linked = any(r["caregiver_user_id"] in ids for r in tables["portal_links"])
        if linked and len(patients) + len(contacts) >= 3 and (
                best is None or len(patients) + len(contacts) < len(best.ids())):
            best = Family(patients, contacts, ids)
            if len(best.ids()) <= 6:
                break
    assert best is not None
    return best


@dataclass(frozen=True)
class Damage:
    table: str
    row: int  # index among the family's rows of that table
    column: str
    kind: str
    value: str = ""  # the damaged value (kinds written through csv)

    def must_be_unreadable(self) -> bool:
        key = (self.table, self.column)
        return self.kind in ("control", "latin1", "fields", "slash", "dots", "long", "typo",
                             "naive", "date") or (self.kind == "blank" and key in REQUIRED_IDS)


def _kinds(table: str, column: str) -> list[str]:
    key = (table, column)
    if key in REQUIRED_IDS:
        return ["blank", "long", "control", "slash", "dots", "fields", "quote"]
    if key in OPTIONAL_IDS:
        return ["long", "control", "slash", "dots", "quote"]
    if column in TIMES:
        return ["naive", "date", "control", "quote"] + (["blank"] if column != "at" else [])
    if column in TYPOS:
        return ["typo", "control", "latin1", "quote"]
    return ["control", "latin1", "quote", "fields"]


def _apply(value: str, damage: Damage, draw: Any) -> str:
    kind = damage.kind
    if kind == "blank":
        return ""
    if kind == "long":
        return "9" * draw(st.integers(65, 3000))
    if kind == "control":
        char = draw(st.sampled_from(CONTROLS))
        at = draw(st.integers(0, len(value)))
        return value[:at] + char + value[at:]
    if kind == "slash":
        return value + "/" + value
    if kind == "dots":
        return draw(st.sampled_from([".", ".."]))
    if kind == "typo":
        return TYPOS[damage.column]
    if kind == "naive":
        return value[:19] if value else "2026-11-02T09:55:00"
    if kind == "date":
        return "11/02/2026 09:55"
    if kind == "latin1":
        return value + "\udce9"  # written as the single latin-1 byte 0xE9
    return value


@st.composite
def damages(draw: Any, family_rows: dict[str, list[dict[str, str]]]) -> list[Damage]:
    tables = sorted(t for t, rows in family_rows.items() if rows and t != "portal_audit")
    out = []
    for _ in range(draw(st.integers(1, 3))):
        table = draw(st.sampled_from(tables))
        row = draw(st.integers(0, len(family_rows[table]) - 1))
        column = draw(st.sampled_from(LAYOUT[table]))
        kind = draw(st.sampled_from(_kinds(table, column)))
        d = Damage(table, row, column, kind)
        out.append(Damage(table, row, column, kind,
                          _apply(family_rows[table][row][column], d, draw)))
    return out


def _line(values: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


def write_practice(root: Path, tables: dict[str, list[dict[str, str]]], family: Family,
                   damaged: tuple[Damage, ...] | list[Damage] = ()) -> None:
    """Every table with the family's rows last, some of them damaged (written raw)."""
    for table, rows in tables.items():
        (root / DIRS[table]).mkdir(parents=True, exist_ok=True)
        columns = LAYOUT[table]
        others = [r for r in rows if not family.owns(table, r)]
        own = [dict(r) for r in rows if family.owns(table, r)]
        raw: dict[int, str] = {}
        for d in damaged:
            if d.table != table:
                continue
            row = own[d.row]
            values = [row[c] for c in columns]
            i = columns.index(d.column)
            if d.kind == "quote":
                values = [v.replace('"', "") for v in values]
                values[i] = '"' + values[i]
                raw[d.row] = ",".join(values) + "\n"
            elif d.kind == "fields":
                raw[d.row] = _line(values).rstrip("\n") + ",extra\n"
            else:
                row[d.column] = d.value
        body = _line(list(columns)) + "".join(_line([r[c] for c in columns]) for r in others)
        for n, r in enumerate(own):
            body += raw.get(n) or _line([r[c] for c in columns])
        (root / DIRS[table] / f"{table}.csv").write_bytes(
            body.encode("utf-8", "surrogateescape"))


# -- running on both state databases -----------------------------------------------------


@pytest.fixture(scope="module")
def pg_state() -> Iterator[str]:
    for url in _throwaway_database("oprecon_meta"):
        migrate(url)
        yield url


@dataclass
class Runner:
    url: str
    engine: sa.Engine
    baseline: dict[str, Finding] | None = None

    def run(self, root: Path) -> list[Finding]:
        practice = f"m{uuid.uuid4().hex[:12]}"
        s = load_settings(state_db_url=self.url, redis_url=REDIS_URL, broker_url=BROKER_URL,
                          practice=practice, metrics_port=0, unreadable_alert_percent=100)
        deps = Deps(s, session_factory(self.engine), CsvOPSource(root / "op"),
                    CsvPortalSource(root / "portal"))
        result = reconcile(deps, now=NOW)  # raises if the run fails
        return [i.finding for i in result.plan.items]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def runner(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Runner]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('meta') / 'state.sqlite'}"
        migrate(url)
    else:
        url = request.getfixturevalue("pg_state")
    engine = make_engine(url)
    yield Runner(url, engine)
    engine.dispose()


# The practice and the family, read once at import: hypothesis draws from them.
TABLES = _read(_demo_dir())
FAMILY = _family(TABLES)
OWN_ROWS = {t: [r for r in rows if FAMILY.owns(t, r)] for t, rows in TABLES.items()}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("meta-base") / "clean"
    write_practice(root, TABLES, FAMILY)
    return root


def _touches(f: Finding, ids: set[str]) -> bool:
    return bool({f.patient_id, f.contact_id, f.portal_user_id, *f.contact_ids} & ids)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(damaged=damages(OWN_ROWS))
def test_damage_to_one_family_changes_nothing_else(
    damaged: list[Damage], runner: Runner, clean: Path,
    tmp_path_factory: pytest.TempPathFactory
) -> None:
    if runner.baseline is None:
        runner.baseline = {f.fingerprint: f for f in runner.run(clean)}
    baseline = runner.baseline
    ids = FAMILY.ids()
    root = tmp_path_factory.mktemp("damaged")
    write_practice(root, TABLES, FAMILY, damaged)

    found = {f.fingerprint: f for f in runner.run(root)}

    # Every new invalid_record is about the family (or names no id at all).
    new_invalid = [f for fp, f in found.items()
                   if f.check == "invalid_record" and fp not in baseline]
    assert all(_touches(f, ids) or not (f.patient_id or f.contact_id or f.portal_user_id)
               for f in new_invalid), [f.detail for f in new_invalid]
    if any(d.must_be_unreadable() for d in damaged):
        assert new_invalid, damaged

    # Other families: exactly as before (a blind file may only withhold absences).
    snap = read_snapshot(CsvOPSource(root / "op"), CsvPortalSource(root / "portal"))
    before = {fp for fp, f in baseline.items() if not _touches(f, ids)}
    anonymous = {f.fingerprint for f in new_invalid}
    after = {fp for fp, f in found.items() if not _touches(f, ids) and fp not in anonymous}
    assert after <= before, ([found[fp].detail for fp in after - before], damaged)
    withheld = before - after
    if not snap.unknown.blind:
        assert not withheld, ([baseline[fp].detail for fp in withheld], damaged)
    else:
        assert {baseline[fp].check for fp in withheld} <= ABSENCE_CHECKS, damaged

    # The family: no comparison with the portal that the clean run did not make.
    claims = {fp for fp, f in found.items()
              if _touches(f, ids) and BY_ID[f.check].cross_system}
    invented = claims - set(baseline)
    assert not invented, ([found[fp].detail for fp in invented], damaged)

