"""Drill: input oprecon did not write (issue 13), one test per case a hostile or broken
upstream showed, on hand-made practices whose expected outcome is read off the data.

Cases 1, 2, 6 run through the engine on SQLite and PostgreSQL state databases; case 3's
HTTP bounds, 4 and 7 against small local HTTP servers of the test's own; 3's special
files, 5 and the start-up warning through the `oprecon` command.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import ssl
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from sqlalchemy import select

from tests import factory as fx
from tests.procs import base_env, oprecon
from worker.checks import CheckContext, run_checks
from worker.model.findings import Finding
from worker.model.records import is_dummy_email
from worker.scan.engine import Deps, reconcile
from worker.sources.base import SourceError
from worker.sources.csv_source import (
    CsvLimits,
    CsvOPSource,
    CsvPortalSource,
    write_op_csv,
    write_portal_csv,
)
from worker.sources.portal_http import (
    HttpPortal,
    PortalLimitError,
    PortalRejected,
    PortalTlsError,
)
from worker.state.db import make_engine, migrate, session_factory
from worker.state.models import ActionRow, FindingRow
from worker.state.models import FindingState as S

NOW = datetime(2026, 11, 2, 14, 0, tzinfo=UTC)
OLD = "2026-01-01T00:00:00+00:00"
TLS = Path(__file__).resolve().parent.parent / "fixtures" / "tls"


# -- a practice of families, written as exports -------------------------------------------


def families(n: int) -> list[object]:
    """n clean families: child P{i}, mother C{i} (Joint), caregiver U{i}c linked to the
    child's user U{i}p. Family 1's mother has a malformed email (one open finding)."""
    records: list[object] = []
    for i in range(1, n + 1):
        email = "broken@@example.org" if i == 1 else f"c{i}@example.org"
        records += [fx.patient(f"P{i}"), fx.contact(f"C{i}", email=email),
                    fx.fc(f"P{i}", f"C{i}"), fx.caregiver(f"U{i}c", f"C{i}", email=email),
                    fx.patient_user(f"U{i}p", f"P{i}"), fx.link(f"U{i}c", f"U{i}p"),
                    fx.source(f"U{i}c")]
    return records


def write(root: Path, records: list[object]) -> Path:
    of = lambda cls: [r for r in records if type(r).__name__ == cls]  # noqa: E731
    write_op_csv(root / "op", of("Patient"), of("Contact"), of("FamilyContact"))
    write_portal_csv(root / "portal", of("PortalUser"), of("CaregiverLink"),
                     of("PortalSource"), of("AuditEvent"))
    return root


def edit(path: Path, change: Callable[[list[list[str]]], None]) -> None:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    change(rows)
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.sqlite'}"
        migrate(url)
        return session_factory(make_engine(url))
    return request.getfixturevalue("pg_sessions")


@pytest.fixture
def run(sessions: Any, make_settings: Any) -> Callable[..., tuple[list[Finding], Any]]:
    def go(root: Path, **overrides: Any) -> tuple[list[Finding], Any]:
        now = overrides.pop("now", NOW)
        settings = make_settings(**overrides)
        deps = Deps(settings, sessions,
                    CsvOPSource(root / "op", zone=settings.op_zone),
                    CsvPortalSource(root / "portal"))
        result = reconcile(deps, now=now)
        return [i.finding for i in result.plan.items], result

    return go


def state_of(sessions: Any, check: str) -> list[str]:
    with sessions() as s:
        return [r.state for r in s.scalars(
            select(FindingRow).where(FindingRow.practice == "test", FindingRow.check == check))]


def checks(findings: list[Finding]) -> list[str]:
    return sorted(f.check for f in findings)


# -- case 1: an unreadable row is unknown, not absent ------------------------------------


def test_authority_typo_makes_the_pair_unknown_not_a_stale_link(
    tmp_path: Path, run: Any, sessions: Any
) -> None:
    root = write(tmp_path, families(120))  # one bad row: under 1% of the file
    first, _ = run(root)
    assert checks(first) == ["contact_email_invalid"]

    edit(root / "op/family_contacts.csv", lambda rows: rows[1].__setitem__(3, "Jiont"))
    found, result = run(root)

    # No privacy alert for a link whose authorization could not be read...
    assert checks(found) == ["invalid_record"]
    detail = found[0].detail
    assert "family_contacts.csv line 2: unknown authority 'Jiont'" in detail
    assert "contact C1 on chart P1 is unknown this run" in detail
    # ...and the open finding that rests on that row is not resolved as "no longer found".
    assert state_of(sessions, "contact_email_invalid") == [S.OPEN]
    assert result.sync.resolved == 0


def test_a_date_format_change_is_one_alert_for_the_file_and_no_fixes(
    tmp_path: Path, run: Any
) -> None:
    records = families(20)
    records = [r for r in records if "U2c" not in (getattr(r, "user_id", ""),
                                                   getattr(r, "caregiver_user_id", ""))]
    root = write(tmp_path, records)  # family 2's parent has no account: a Welcome resend

    def us_dates(rows: list[list[str]]) -> None:
        for row in rows[1:]:
            row[4] = "01/01/2026 00:00"

    edit(root / "op/family_contacts.csv", us_dates)
    found, result = run(root)
    alerts = [f for f in found if f.check == "invalid_record"]
    assert len(alerts) == 1 and alerts[0].severity == "high"
    assert alerts[0].detail.startswith(
        "family_contacts.csv: 20 of 20 rows (100.0%) cannot be read, over the 1% limit")
    assert not [f for f in found if f.check in ("caregiver_link_stale", "welcome_not_sent",
                                                 "caregiver_link_missing")]
    assert not result.plan.fixes


def _partial_deps(root: Path, sessions: Any, make_settings: Any) -> Deps:
    """Over exports, planning fixes as if the portal took them (what is asserted is
    that none is planned), with no propagation delay so a mismatch is acted on at once."""
    return Deps(make_settings(propagation_delay_minutes=0), sessions, CsvOPSource(root / "op"),
                CsvPortalSource(root / "portal"), portal_writable=True)


def _real_email_on(root: Path, user_id: str, at: datetime) -> None:
    """Someone types a real address on a child's portal account: a fix (dummy email)."""
    def change(rows: list[list[str]]) -> None:
        for row in rows[1:]:
            if row[0] == user_id:
                row[5], row[8] = "kid@example.org", at.isoformat()

    edit(root / "portal/portal_users.csv", change)


def test_an_incremental_scan_raises_the_unreadable_alert_and_plans_no_fixes(
    tmp_path: Path, sessions: Any, make_settings: Any
) -> None:
    """The date format of family_contacts.csv changes after the nightly full scan. Every
    row's time is unreadable, so the next incremental scan reads them all as changed:
    one high alert for the file, as a full scan raises, no fix planned (not even one
    the family contacts do not touch), nothing resolved; and the verdict stays for the
    partial runs after it until a full read finds the file readable."""
    from worker.scan.incremental import full_reconcile, incremental_reconcile

    root = write(tmp_path, families(20))
    deps = _partial_deps(root, sessions, make_settings)
    assert checks([i.finding for i in full_reconcile(deps, NOW).plan.items]) == [
        "contact_email_invalid"]

    def us_dates(rows: list[list[str]]) -> None:
        for row in rows[1:]:
            row[4] = "01/01/2026 00:00"

    edit(root / "op/family_contacts.csv", us_dates)
    _real_email_on(root, "U3p", NOW + timedelta(minutes=1))
    result = incremental_reconcile(deps, NOW + timedelta(minutes=2))
    found = [i.finding for i in result.plan.items]
    alerts = [f for f in found if f.check == "invalid_record"]
    assert len(alerts) == 1 and alerts[0].severity == "high"
    assert alerts[0].detail.startswith(
        "family_contacts.csv: at least 20 of 20 rows (100.0%) cannot be read (counted among "
        "the rows changed since the last scan), over the 1% limit")
    [dummy] = [i for i in result.plan.items
               if i.finding.check == "portal_patient_email_not_dummy"]
    assert dummy.decision == "alert" and "too much of the input cannot be read" in dummy.reason
    assert not result.plan.fixes and result.action_ids == []
    assert result.sync.resolved == 0 and state_of(sessions, "contact_email_invalid") == [S.OPEN]

    # The export is mended (the rows keep their old times): an incremental scan does not
    # read them again, so the verdict of the scan that found the file broken stands...
    edit(root / "op/family_contacts.csv",
         lambda rows: [row.__setitem__(4, OLD) for row in rows[1:]])
    later = incremental_reconcile(deps, NOW + timedelta(minutes=4))
    [dummy] = [i for i in later.plan.items
               if i.finding.check == "portal_patient_email_not_dummy"]
    assert not later.plan.fixes and dummy.reason == (
        "too much of the input could not be read when last measured (family_contacts (20 "
        f"of 20 rows, run {result.run_id})): no fixes until a full read finds it readable")
    # ...until a full read finds it readable: the alert is resolved, the fix planned.
    full = full_reconcile(deps, NOW + timedelta(minutes=5))
    assert [i.finding.check for i in full.plan.fixes] == ["portal_patient_email_not_dummy"]
    with sessions() as s:
        states = {r.severity: r.state for r in s.scalars(select(FindingRow).where(
            FindingRow.check == "invalid_record"))}
    assert states == {"high": S.RESOLVED}


def test_an_incremental_scan_keeps_to_the_last_full_reads_verdict(
    tmp_path: Path, sessions: Any, make_settings: Any
) -> None:
    """Ten authority typos in 20 family contacts, with their old times: the full scan
    raises the file's alert. The incremental scans after it do not read those rows again
    (they did not change), but they plan no fixes either, as the full scan did not."""
    from worker.scan.incremental import full_reconcile, incremental_reconcile

    root = write(tmp_path, families(20))
    edit(root / "op/family_contacts.csv",
         lambda rows: [row.__setitem__(3, "Jiont") for row in rows[1:11]])
    deps = _partial_deps(root, sessions, make_settings)
    first = full_reconcile(deps, NOW)
    [alert] = [i.finding for i in first.plan.items if i.finding.severity == "high"]
    assert alert.detail.startswith("family_contacts.csv: 10 of 20 rows (50.0%) cannot be read")

    _real_email_on(root, "U13p", NOW + timedelta(minutes=1))
    result = incremental_reconcile(deps, NOW + timedelta(minutes=2))
    [dummy] = [i for i in result.plan.items]
    assert dummy.finding.check == "portal_patient_email_not_dummy"
    assert dummy.decision == "alert" and dummy.reason == (
        "too much of the input could not be read when last measured (family_contacts (10 "
        f"of 20 rows, run {first.run_id})): no fixes until a full read finds it readable")
    assert result.action_ids == []
    with sessions() as s:  # the file's alert is the full scan's, still open
        assert [r.state for r in s.scalars(select(FindingRow).where(
            FindingRow.check == "invalid_record", FindingRow.severity == "high"))] == [S.OPEN]


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_a_sharded_full_scan_raises_the_unreadable_alert_and_releases_no_fix(
    tmp_path: Path, sessions: Any, make_settings: Any, order: tuple[int, int]
) -> None:
    """The same date format change under a sharded full scan, whichever shard finishes
    last: one alert for the file (by shard 0), no finding per row from either shard, no
    fix released, and the verdict kept for the incremental scans after it."""
    from worker.scan import shards
    from worker.scan.engine import BLIND_KEY
    from worker.state.db import kv_get

    root = write(tmp_path, families(20))
    edit(root / "op/family_contacts.csv",
         lambda rows: [row.__setitem__(4, "01/01/2026 00:00") for row in rows[1:]])
    _real_email_on(root, "U3p", NOW - timedelta(hours=1))
    deps = _partial_deps(root, sessions, make_settings)
    parent = shards.start(deps, 2, now=NOW)
    results = {i: shards.run_shard(deps, parent, i, 2, now=NOW) for i in order}
    with sessions() as s:
        rows = list(s.scalars(select(FindingRow).where(FindingRow.check == "invalid_record")))
        kept = kv_get(s, "test", BLIND_KEY)
    [row] = rows
    assert row.severity == "high" and row.detail.startswith(
        "family_contacts.csv: 20 of 20 rows (100.0%) cannot be read, over the 1% limit")
    with sessions() as s:
        dummy = s.scalars(select(FindingRow).where(
            FindingRow.check == "portal_patient_email_not_dummy")).one()
    assert dummy.portal_user_id == "U3p" and dummy.state == S.OPEN
    assert not any(r.plan.fixes for r in results.values())  # both measured the file
    assert results[order[-1]].action_ids == []
    with sessions() as s:
        statuses = {a.status for a in s.scalars(select(ActionRow))}
    assert statuses <= {"deferred"}  # kept for the next run that can act, none released
    assert kept is not None and set(kept["over"]) == {"family_contacts"}
    assert kept["over"]["family_contacts"]["run_id"] == parent


def test_an_unterminated_quote_reports_the_rows_it_swallowed_by_line_range(
    tmp_path: Path, run: Any
) -> None:
    root = write(tmp_path, families(30))
    path = root / "op/family_contacts.csv"
    lines = path.read_text().splitlines(keepends=True)
    lines[4] = lines[4].replace(",Mother,", ',"Mother,')  # line 5 opens a quote for good
    path.write_text("".join(lines))

    found, _ = run(root, unreadable_alert_percent=100)
    invalid = [f.detail for f in found if f.check == "invalid_record"]
    assert len(invalid) == 1
    assert "family_contacts.csv lines 5-31: " in invalid[0]
    assert "; 27 lines cannot be read (a quote left open swallows the rows after it)" in (
        invalid[0])
    assert "27 row(s) unreadable (27 identified)" in invalid[0]
    # The 27 parents whose rows were swallowed are not "no longer authorized".
    assert not [f for f in found if f.check == "caregiver_link_stale"]


# -- case 2: no single row fails a run, on either state database ---------------------------


def test_nul_bytes_and_long_ids_are_invalid_records_not_a_failed_run(
    tmp_path: Path, run: Any, sessions: Any
) -> None:
    root = write(tmp_path, families(3))
    edit(root / "op/patients.csv", lambda rows: rows[1].__setitem__(5, "Act\0ive"))
    edit(root / "op/contacts.csv", lambda rows: rows[2].__setitem__(0, "C" * 70))
    edit(root / "portal/portal_users.csv",
         lambda rows: rows[3].__setitem__(6, "Pat\x1b[2Jient"))

    found, result = run(root)  # twice: a row that stays must not fail later scans either
    found, result = run(root)
    assert result.run_id is not None
    details = sorted(f.detail for f in found if f.check == "invalid_record")
    assert any("patients.csv line 2: control character in status" in d for d in details)
    assert any("contacts.csv line 3: bad contact_id (longer than 64 characters)" in d
               for d in details)
    assert any("portal_users.csv line 4: control character in role" in d for d in details)
    with sessions() as s:
        stored = [r.detail for r in s.scalars(select(FindingRow))]
    assert not any("\0" in d or "\x1b" in d for d in stored)


# -- case 3: bounded reads ---------------------------------------------------------------


def test_a_fifo_and_a_device_are_refused_in_one_line(tmp_path: Path) -> None:
    root = write(tmp_path, families(1))
    (root / "op/contacts.csv").unlink()
    os.mkfifo(root / "op/contacts.csv")
    with pytest.raises(SourceError, match=r"contacts.csv is a FIFO, not a regular file"):
        list(CsvOPSource(root / "op").contacts())
    (root / "op/contacts.csv").unlink()
    (root / "op/contacts.csv").symlink_to("/dev/zero")
    done = oprecon("reconcile", "--all", "--op-dir", str(root / "op"), "--portal-dir",
                   str(root / "portal"), env=base_env(
                       OPRECON_STATE_DB_URL=f"sqlite:///{tmp_path / 's.sqlite'}"),
                   cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"oprecon: {root / 'op/contacts.csv'} is a device, not a regular file: refused"]


def test_a_huge_line_costs_its_limit_not_its_size(tmp_path: Path) -> None:
    root = write(tmp_path, families(2))
    with (root / "op/contacts.csv").open("a") as fh:
        fh.write("C9,Ann," + "x" * 30_000_000 + ",,,,,,,true,,\n")  # one 30 MB line
        fh.write("C10,Bo,Lee,,,,,,,true,," + OLD + "\n")
    tracemalloc.start()
    try:
        got = list(CsvOPSource(root / "op", CsvLimits(64 * 1024, 1024 * 1024)).contacts())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * 1024 * 1024
    bad = [r for r in got if type(r).__name__ == "InvalidRecord"]
    assert [(b.line, b.contact_id, b.reason) for b in bad] == [
        (4, "C9", "line longer than 1048576 characters (csv_max_line_chars)")]
    assert [getattr(r, "contact_id", None) for r in got if r not in bad] == ["C1", "C2", "C10"]


class Hostile(BaseHTTPRequestHandler):
    """A portal gone wrong: `mode` (a class attribute set per test) picks how."""

    mode = "ok"
    paths: list[str] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        Hostile.paths.append(self.path)
        if self.mode == "bomb":  # ~100 KB on the wire, 100 MB unpacked
            self._send(BOMB, {"Content-Encoding": "gzip"})
        elif self.mode == "trickle":  # a byte every 0.5 s: every read is "on time"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass
        elif self.mode == "cursors":  # a fresh next_cursor, for ever
            self._send(json.dumps({"items": [], "next_cursor": f"c{len(Hostile.paths)}"})
                       .encode())
        elif self.mode == "dots":
            self._send(json.dumps({"items": [
                {"user_id": "..", "op_patient_id": "P1", "role": "Patient", "active": True,
                 "email": "p1@dummy.com", "updated_at": OLD}], "next_cursor": None}).encode())
        else:
            self._send(b'{"items": [], "next_cursor": null}')

    do_PATCH = do_POST = do_GET  # noqa: N815


BOMB = gzip.compress(b"\0" * 100_000_000, compresslevel=9)


@pytest.fixture
def hostile() -> Iterator[tuple[str, type[Hostile]]]:
    Hostile.paths = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Hostile
    server.shutdown()
    server.server_close()


def test_a_gzip_bomb_stops_at_the_size_cap(hostile: Any) -> None:
    url, handler = hostile
    handler.mode = "bomb"
    portal = HttpPortal(url, "t", max_retries=0, max_response_bytes=1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(PortalLimitError, match=r"portal GET /users: response over 1048576 "
                           r"bytes \(portal_max_response_bytes\)"):
            list(portal.users())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        portal.close()
    assert peak < 40 * 1024 * 1024


def test_a_trickling_server_meets_the_whole_request_deadline(hostile: Any) -> None:
    url, handler = hostile
    handler.mode = "trickle"
    portal = HttpPortal(url, "t", timeout=5, max_retries=2, request_deadline=2.0)
    started = time.monotonic()
    with pytest.raises(PortalLimitError, match=r"portal GET /users: no complete answer "
                       r"within 2 s \(portal_request_deadline_seconds\)"):
        list(portal.users())
    assert time.monotonic() - started < 5  # not retried: the deadline is the bound
    portal.close()


def test_endless_cursors_stop_at_the_page_cap(hostile: Any) -> None:
    url, handler = hostile
    handler.mode = "cursors"
    portal = HttpPortal(url, "t", max_retries=0, max_pages=25)
    with pytest.raises(PortalLimitError, match=r"portal GET /links: more than 25 pages"):
        list(portal.links())
    assert len(handler.paths) == 25
    portal.close()


def test_a_portal_limit_ends_the_command_with_one_line(hostile: Any, tmp_path: Path) -> None:
    url, handler = hostile
    handler.mode = "cursors"
    root = write(tmp_path, families(1))
    done = oprecon("reconcile", "--all", "--local", env=base_env(
        OPRECON_STATE_DB_URL=f"sqlite:///{tmp_path / 's.sqlite'}", OPRECON_OP_DIR=str(root / "op"),
        OPRECON_PORTAL_SOURCE="http", OPRECON_PORTAL_URL=url, OPRECON_PORTAL_TOKEN="t",
        OPRECON_PORTAL_MAX_PAGES="5"), cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "oprecon: portal GET /users: more than 5 pages (portal_max_pages); "
        "the listing does not end"]


# -- case 4: ids that are paths -----------------------------------------------------------


def test_dot_ids_never_become_paths(hostile: Any, tmp_path: Path) -> None:
    url, handler = hostile
    portal = HttpPortal(url, "t", max_retries=0)
    for bad in (".", "..", "a/b", "U1\r\nX"):
        with pytest.raises(PortalRejected, match="refusing portal user id"):
            portal.set_user_email(bad, "x@dummy.com", "k1")
        with pytest.raises(PortalRejected):
            portal.refresh_source(bad, "k2")
    assert handler.paths == []  # not one request went out
    portal.set_user_email("U 1%", "x@dummy.com", "k3")
    assert handler.paths == ["/users/U%201%25"]  # a real id is one fully encoded segment

    handler.mode = "dots"  # and a portal that lists such an id gets an invalid_record
    got = list(portal.users())
    assert [(type(r).__name__, r.reason) for r in got] == [
        ("InvalidRecord", "bad user_id (is a dot path segment)")]
    portal.close()


# -- case 5: control characters ------------------------------------------------------------


def test_control_characters_reach_no_terminal_and_no_mail_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.cli.main import main

    root = write(tmp_path, families(1))
    monkeypatch.setenv("OPRECON_STATE_DB_URL", f"sqlite:///{tmp_path / 's.sqlite'}")

    def cli(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["oprecon", *args])
        with pytest.raises(SystemExit) as done:
            main()
        out, err = capsys.readouterr()
        return int(done.value.code or 0), out, err

    code, _, err = cli("reconcile", "--patient", "P1\r\nfake row", "--op-dir",
                       str(root / "op"), "--portal-dir", str(root / "portal"))
    assert code == 2
    assert err == "oprecon: --patient: not an id ('P1  fake row' holds a control character)\n"

    # A row stored before ids were checked: `findings` and the digest print it tamed.
    assert cli("reconcile", "--all", "--op-dir", str(root / "op"), "--portal-dir",
               str(root / "portal"))[0] == 0
    engine = make_engine(f"sqlite:///{tmp_path / 's.sqlite'}")
    with session_factory(engine)() as s:
        row = s.scalars(select(FindingRow)).first()
        assert row is not None
        row.patient_id = "P1\x1b[2J\r\nP9"
        row.detail = "chart P1\x1b]0;pwned\x07 \r\nfake: row"
        s.commit()
    engine.dispose()
    code, out, _ = cli("findings")
    assert code == 0 and "\x1b" not in out and "\r" not in out and "\x07" not in out
    code, out, _ = cli("digest", "--preview")
    assert code == 0 and "\x1b" not in out and "\r" not in out


def test_a_digest_subject_is_one_clean_line() -> None:
    from worker.model.text import strip_controls

    assert strip_controls("[oprecon] Action needed now: P1\r\nBcc: x@evil\x1b[0m") == (
        "[oprecon] Action needed now: P1  Bcc: x@evil[0m")


# -- case 6: look-alike values -------------------------------------------------------------


@pytest.mark.parametrize("email,dummy", [
    ("p1@dummy.com", True), ("P1@DUMMY.COM", True), (" p1@Dummy.Com ", True),
    ("ernesto.real@gmail.com,x@dummy.com", False), ("amelia.real@gmail.com x@dummy.com", False),
    ("Amelia <a@dummy.com>", False), ("a@dummy.com.evil.org", False), ("a@sub.dummy.com", False),
    ("@dummy.com", False), ("a@b@dummy.com", False), ("a;b@dummy.com", False),
])
def test_a_dummy_email_is_one_whole_address(email: str, dummy: bool) -> None:
    assert is_dummy_email(email) is dummy
    snap = fx.snap(fx.patient("P1"), fx.patient_user("U1", "P1", email=email))
    found = {f.check for f in run_checks(CheckContext(snap, NOW))}
    assert ("portal_patient_email_not_dummy" in found) is not dummy


def _missing_link_practice(root: Path, when: str) -> Path:
    records = families(1)
    records = [r for r in records if type(r).__name__ != "CaregiverLink"]
    write(root, records)
    edit(root / "op/family_contacts.csv", lambda rows: rows[1].__setitem__(4, when))
    return root


@freeze_time(NOW)
def test_a_time_without_offset_is_invalid_unless_the_source_declares_its_zone(
    tmp_path: Path, run: Any
) -> None:
    # 08:50 in New York is 13:50 UTC: ten minutes before NOW, within the delay.
    root = _missing_link_practice(tmp_path, "2026-11-02T08:50:00")
    found, _ = run(root)
    assert checks(found) == ["invalid_record"]
    assert "bad updated_at '2026-11-02T08:50:00' (no UTC offset" in next(
        f.detail for f in found if f.check == "invalid_record")

    found, result = run(root, op_timezone="America/New_York")
    assert checks(found) == ["contact_email_invalid"]  # the missing link waits
    assert result.suppressed_recent == 1

    found, _ = run(root, op_timezone="America/New_York", now=NOW + timedelta(minutes=6))
    assert "caregiver_link_missing" in checks(found)


@freeze_time(NOW)
def test_a_blank_updated_at_counts_as_recent() -> None:
    snap = fx.snap(fx.patient("P1"), fx.contact("C1"),
                   fx.fc("P1", "C1", updated_at=None),
                   fx.caregiver("U1", "C1"), fx.patient_user("U2", "P1"))
    ctx = CheckContext(snap, NOW)
    assert "caregiver_link_missing" not in {f.check for f in run_checks(ctx)}
    assert ctx.suppressed_recent == 1


def test_a_propagation_delay_under_15_minutes_needs_the_unsafe_setting() -> None:
    from config.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="OPRECON_PROPAGATION_DELAY_MINUTES|propagation"):
        load_settings(propagation_delay_minutes=0)
    assert load_settings(propagation_delay_minutes=0,
                         allow_unsafe_propagation_delay=True).propagation_delay_minutes == 0
    assert load_settings(propagation_delay_minutes=20).propagation_delay_minutes == 20


# -- case 7: secrets and transport ---------------------------------------------------------


def test_a_self_signed_certificate_is_a_tls_failure_not_retried(tmp_path: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TLS / "selfsigned.pem", TLS / "selfsigned.key")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    slept: list[float] = []
    portal = HttpPortal(f"https://127.0.0.1:{server.server_address[1]}", "t",
                        max_retries=3, sleep=slept.append)
    try:
        with pytest.raises(PortalTlsError) as err:
            list(portal.users())
    finally:
        portal.close()
        server.shutdown()
        server.server_close()
    message = str(err.value)
    assert message.startswith("portal GET /users: TLS failure (")
    assert "certificate" in message and "\n" not in message
    assert err.value.attempts == 1 and slept == [] and not err.value.transient


def test_a_plain_http_portal_with_a_token_is_refused_unless_allowed() -> None:
    from config.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="token would travel in clear text"):
        load_settings(portal_source="http", portal_url="http://portal.example.org",
                      portal_token="secret")
    load_settings(portal_source="http", portal_url="http://portal.example.org",
                  portal_token="secret", allow_unsafe_plain_http=True)
    load_settings(portal_source="http", portal_url="https://portal.example.org",
                  portal_token="secret")
    load_settings(portal_source="http", portal_url="http://127.0.0.1:8080",
                  portal_token="secret")  # loopback never leaves the machine


def test_unknown_oprecon_variables_are_reported_at_start(tmp_path: Path) -> None:
    root = write(tmp_path, families(1))
    done = oprecon("reconcile", "--all", "--op-dir", str(root / "op"), "--portal-dir",
                   str(root / "portal"), env=base_env(
                       OPRECON_STATE_DB_URL=f"sqlite:///{tmp_path / 's.sqlite'}",
                       OPRECON_PROPAGATION_DELAY_MINUTS="30",
                       OPRECON_POLICIES__WELCOME_NOT_SENT="alert"),
                   cwd=tmp_path, timeout=60)
    assert done.returncode == 0
    assert [line for line in done.stderr.splitlines() if line.startswith("oprecon:")] == [
        "oprecon: warning: unknown environment variable(s) OPRECON_PROPAGATION_DELAY_MINUTS: "
        "no setting reads them (a typo?)"]


def test_unknown_env_lists_only_typos() -> None:
    from config.settings import unknown_env

    assert unknown_env({"OPRECON_LOG_LEVEL": "x", "OPRECON_POLICIES__SELF_ROLE": "x",
                        "OPRECON_TEST_PG_URL": "x", "OPRECON_LOGLEVEL": "x", "PATH": "x",
                        "OPRECON_CONFIG_FILE": "x"}) == ["OPRECON_LOGLEVEL"]

