"""On-call commands on a seeded state database: findings, silence, pause, status.

The CLI runs in-process through `worker.cli.main.main`, so exit codes and the one-line error
contract are the real ones. Silence boundaries are frozen with freezegun and checked
against the lifecycle the scans apply.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from freezegun import freeze_time
from sqlalchemy import select
from sqlalchemy.engine import make_url

from tests.conftest import BROKER_URL
from tests.factory import MemorySource, contact, fc, patient
from worker.scan.engine import Deps, reconcile
from worker.scan.planner import Decision
from worker.scan.wiring import state_sessions
from worker.state.db import kv_get, kv_set
from worker.state.models import FindingEvent, FindingRow, Run
from worker.state.models import FindingState as S

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            *args: str) -> tuple[int, str, str]:
    from worker.cli.main import main

    monkeypatch.setattr(sys, "argv", ["oprecon", *args])
    with pytest.raises(SystemExit) as done:
        main()
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


def use_env(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    for name in ("state_db_url", "redis_url", "broker_url", "practice", "heartbeat_dir"):
        monkeypatch.setenv(f"OPRECON_{name.upper()}", str(getattr(settings, name)))
    monkeypatch.setenv("OPRECON_LOG_FORMAT", "json")


def finding(fp: str, check: str, state: str, severity: str = "warning", *,
            at: datetime = T0, **kw: Any) -> FindingRow:
    return FindingRow(practice="test", fingerprint=fp, check=check, severity=severity,
                      state=state, first_seen_at=at, last_seen_at=at, state_changed_at=at,
                      detail=f"{check} detail", **kw)


def seed(settings: Any) -> Any:
    sessions = state_sessions(settings)
    with sessions.begin() as s:
        s.add_all([
            finding("fp-open", "patient_email_present", S.OPEN, patient_id="P1"),
            finding("fp-high", "caregiver_link_stale", S.OPEN, "high", patient_id="P2",
                    contact_id="C2", portal_user_id="U2", at=T0 + timedelta(hours=1)),
            finding("fp-held", "caregiver_link_missing", S.HELD, patient_id="P3",
                    next_check_at=T0 + timedelta(hours=2), fix_attempts=1),
            finding("fp-held-due", "caregiver_link_missing", S.HELD, patient_id="P4",
                    next_check_at=T0 - timedelta(minutes=1), fix_attempts=1),
            finding("fp-dup", "contact_duplicate", S.OPEN, contact_id="C5",
                    contact_ids=["C5", "C6"]),
            finding("fp-gone", "welcome_not_sent", S.RESOLVED, "info", contact_id="C7",
                    resolved_at=T0),
            finding("fp-fixing", "portal_patient_email_not_dummy", S.FIX_QUEUED,
                    patient_id="P8", portal_user_id="U8"),
        ])
    return sessions


# -- findings --------------------------------------------------------------------------------


def test_findings_table_shows_unresolved_most_severe_first(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    seed(settings)
    use_env(monkeypatch, settings)
    with freeze_time(T0 + timedelta(hours=1, minutes=30)):
        code, out, _ = run_cli(monkeypatch, capsys, "findings")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["fingerprint", "check", "severity", "state", "ids", "age",
                                "next", "check"]
    assert lines[2].startswith("fp-high")  # high severity first
    assert "fp-gone" not in out  # resolved: hidden unless asked
    held = next(line for line in lines if line.startswith("fp-held "))
    assert "patient=P3" in held and "1h30m" in held and "verify in 30m00s" in held
    due = next(line for line in lines if line.startswith("fp-held-due"))
    assert "verify at next scan" in due
    assert "contacts=C5,C6" in out
    assert lines[-1] == "6 unresolved finding(s)"


def test_findings_filters_json_and_limit(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    seed(settings)
    use_env(monkeypatch, settings)
    code, out, _ = run_cli(monkeypatch, capsys, "findings", "--json", "--state", "all")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 7
    assert rows[0]["fingerprint"] == "fp-high" and rows[0]["severity"] == "high"
    assert {"fingerprint", "check", "state", "patient_id", "next_check_at",
            "silenced_until"} <= set(rows[0])

    code, out, _ = run_cli(monkeypatch, capsys, "findings", "--check", "caregiver_link_missing")
    assert out.count("fp-held") == 2 and out.splitlines()[-1].endswith("for caregiver_link_missing")
    code, out, _ = run_cli(monkeypatch, capsys, "findings", "--state", "resolved")
    assert "fp-gone" in out and "fp-open" not in out
    code, out, _ = run_cli(monkeypatch, capsys, "findings", "--limit", "2")
    assert out.splitlines()[-1] == "2 of 6 unresolved finding(s)"


@pytest.mark.parametrize("args, message", [
    (("--check", "no_such_check"), "unknown check id"),
    (("--state", "sleeping"), "--state: one of"),
])
def test_findings_bad_filters_are_one_line_errors(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...], message: str,
) -> None:
    settings = make_settings()
    seed(settings)
    use_env(monkeypatch, settings)
    code, out, err = run_cli(monkeypatch, capsys, "findings", *args)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err


def test_findings_without_a_state_database_says_so(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    use_env(monkeypatch, settings)
    code, _, err = run_cli(monkeypatch, capsys, "findings")
    assert code == 2 and "no state database" in err and err.count("\n") == 1
    assert not Path(str(make_url(settings.state_db_url).database)).exists()  # a look creates none


# -- silence -----------------------------------------------------------------------------------


def test_silence_and_unsilence_write_state_and_events(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    sessions = seed(settings)
    use_env(monkeypatch, settings)
    with freeze_time(T0):
        code, out, _ = run_cli(monkeypatch, capsys, "silence", "fp-open", "--until",
                               "2026-04-01", "--reason", "family moving practices",
                               "--by", "frontdesk")
    assert code == 0 and out.startswith("silenced fp-open")
    with sessions() as s:
        row = s.scalar(select(FindingRow).where(FindingRow.fingerprint == "fp-open"))
        assert row.state == S.SILENCED and row.silenced_by == "frontdesk"
        assert row.silenced_until == datetime(2026, 4, 1, tzinfo=UTC)
        assert row.silence_reason == "family moving practices"
        events = s.scalars(select(FindingEvent).where(FindingEvent.finding_id == row.id)).all()
        assert [(e.from_state, e.to_state) for e in events] == [("open", "silenced")]

    with freeze_time(T0 + timedelta(days=1)):
        code, out, _ = run_cli(monkeypatch, capsys, "unsilence", "fp-open")
    assert code == 0 and "open again" in out
    with sessions() as s:
        row = s.scalar(select(FindingRow).where(FindingRow.fingerprint == "fp-open"))
        assert row.state == S.OPEN and row.silenced_until is None and row.silenced_by is None
        events = s.scalars(select(FindingEvent).where(FindingEvent.finding_id == row.id)
                           .order_by(FindingEvent.id)).all()
        assert [e.to_state for e in events] == ["silenced", "open"]
    code, out, _ = run_cli(monkeypatch, capsys, "unsilence", "fp-open")
    assert code == 0 and "not silenced" in out


@pytest.mark.parametrize("fp, until, message", [
    ("fp-nope", "2026-04-01", "no finding with fingerprint fp-nope"),
    ("fp-open", "2026-03-01", "is not in the future"),
    ("fp-gone", "2026-04-01", "is resolved"),
    ("fp-fixing", "2026-04-01", "fix in progress"),
])
def test_silence_refusals_are_one_line_exit_2(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    fp: str, until: str, message: str,
) -> None:
    settings = make_settings()
    seed(settings)
    use_env(monkeypatch, settings)
    with freeze_time(T0):
        code, out, err = run_cli(monkeypatch, capsys, "silence", fp, "--until", until,
                                 "--reason", "x")
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err


def _child_with_email() -> list[object]:
    return [patient("P1", email="kid@example.org"), contact("C1"), fc("P1", "C1")]


def test_silence_holds_until_exactly_its_end_in_listing_and_in_scans(
    make_settings: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.cli.state import list_findings, set_silence

    settings = make_settings()
    source = MemorySource(_child_with_email())
    deps = Deps(settings, state_sessions(settings), source, source)
    first = reconcile(deps, kind="incremental", now=T0)
    fp = next(i.finding.fingerprint for i in first.plan.items
              if i.finding.check == "patient_email_present")
    until = T0 + timedelta(days=3)
    set_silence(settings, fp, until, "chart fixed by billing next week", "alice", now=T0)
    assert capsys.readouterr().out.startswith(f"silenced {fp}")

    just_before = until - timedelta(seconds=1)
    with freeze_time(just_before):
        list_findings(settings, "patient_email_present", None, True, 10)
    row = json.loads(capsys.readouterr().out)
    assert row["state"] == "silenced" and row["effective_state"] == "silenced"
    before = reconcile(deps, kind="incremental", now=just_before)
    item = next(i for i in before.plan.items if i.finding.fingerprint == fp)
    assert item.decision is Decision.SILENCED

    with freeze_time(until):
        list_findings(settings, "patient_email_present", None, False, 10)
    assert "silence ended" in capsys.readouterr().out
    at_end = reconcile(deps, kind="incremental", now=until)
    item = next(i for i in at_end.plan.items if i.finding.fingerprint == fp)
    assert item.decision is not Decision.SILENCED
    with deps.sessions() as s:
        assert s.scalar(select(FindingRow.state).where(FindingRow.fingerprint == fp)) == S.OPEN


# -- pause -------------------------------------------------------------------------------------


def test_pause_and_resume_flip_the_switch_runs_read(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    use_env(monkeypatch, settings)
    with freeze_time(T0):
        code, out, _ = run_cli(monkeypatch, capsys, "pause", "--reason", "portal maintenance")
    assert code == 0 and out.startswith("fixes paused: portal maintenance")
    sessions = state_sessions(settings)
    with sessions() as s:
        assert kv_get(s, "test", "paused") == {"paused": True, "reason": "portal maintenance",
                                               "at": T0.isoformat()}
    code, out, _ = run_cli(monkeypatch, capsys, "resume")
    assert code == 0 and out.strip() == f"fixes resumed (paused since {T0.isoformat()})"
    with sessions() as s:
        assert kv_get(s, "test", "paused")["paused"] is False


# -- status ------------------------------------------------------------------------------------


@pytest.mark.services
def test_status_on_postgres_shows_runs_schedule_queues_holds_and_masks_secrets(
    pg_database: str, make_settings: Any, redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    db_url = make_url(pg_database).set(password="sekrit-pw").render_as_string(False)
    settings = make_settings(state_db_url=db_url, practice="status-test")
    sessions = state_sessions(settings)
    now = datetime.now(UTC).replace(microsecond=0)
    with sessions.begin() as s:
        s.add_all([
            Run(practice="status-test", kind="incremental", scope="all", status="succeeded",
                started_at=now - timedelta(minutes=2), finished_at=now - timedelta(minutes=1),
                records_read=1200, findings_total=9, findings_new=2, findings_resolved=1,
                fixes_queued=1, alerts=3, task_id="t-inc"),
            Run(practice="status-test", kind="adhoc", scope="patient:P9", status="failed",
                started_at=now - timedelta(minutes=5), finished_at=now - timedelta(minutes=5),
                error="OperationalError: connection to server failed", task_id="t-adhoc"),
            Run(practice="status-test", kind="full", scope="all", status="running",
                started_at=now - timedelta(hours=2), task_id="t-lost"),
        ])
        for fp, ends in (("st-held", timedelta(minutes=12)), ("st-due", -timedelta(minutes=1))):
            s.add(FindingRow(practice="status-test", fingerprint=fp, severity="warning",
                             check="caregiver_link_missing", state=S.HELD, first_seen_at=now,
                             last_seen_at=now, state_changed_at=now, next_check_at=now + ends))
        kv_set(s, "status-test", "paused",
               {"paused": True, "reason": "audit", "at": now.isoformat()}, now)
        kv_set(s, "status-test", "breaker", {"state": "open", "opened_at": now.isoformat()}, now)
        kv_set(s, "status-test", "last_success",
               {"at": (now - timedelta(minutes=2)).isoformat(), "run_id": 1,
                "kind": "incremental"}, now)
    # What RedBeat keeps: entry keys scored by their next due time.
    prefix = "oprecon:status-test:redbeat"
    redis_client.zadd(f"{prefix}:schedule", {f"{prefix}incremental-scan": now.timestamp() + 120})
    broker = redis.Redis.from_url(BROKER_URL)
    broker.flushdb()
    broker.rpush("scan", "m1", "m2")
    broker.rpush("fix\x06\x163", "m3")

    use_env(monkeypatch, settings)
    try:
        code, out, _ = run_cli(monkeypatch, capsys, "status")
        assert code == 0
        assert "sekrit-pw" not in out and "postgres:***@" in out
        assert "PAUSED since" in out and "audit" in out and "portal breaker open" in out
        assert "incremental run 1 succeeded 2m" in out and "dead-man's switch ok" in out
        assert "holds      2 held, 1 due for verification, next ends in 1" in out
        assert "queues     scan 2 · fix 1 · digest 0" in out
        runs = out.split("Last runs")[1].split("Schedule")[0]
        assert "lost" in runs  # a 'running' row older than the hard limit
        assert "failed" in runs and "connection to server" not in runs
        sched = out.split("Schedule (next due from RedBeat)")[1]
        inc = next(line for line in sched.splitlines() if line.startswith("incremental-scan"))
        assert "every 5m00s" in inc and re.search(r"in (11\ds|2m00s)$", inc)
        full = next(line for line in sched.splitlines() if line.startswith("full-scan-nightly"))
        assert "cron 15 2 * * *" in full and "not scheduled yet" in full

        code, out, _ = run_cli(monkeypatch, capsys, "status", "--json")
        st = json.loads(out)
        assert code == 0 and st["errors"] == []
        assert st["queues"] == {"scan": 2, "fix": 1, "digest": 0}
        assert st["holds"]["due"] == 1 and st["holds"]["held"] == 2
        assert [r["status"] for r in st["runs"]] == ["succeeded", "failed", "lost"]
        assert st["runs"][1]["error"] == "OperationalError: connection to server failed"
        assert st["last_success"]["age_seconds"] >= 120
        assert "sekrit-pw" not in out
    finally:
        broker.flushdb()
        broker.close()
        sessions.kw["bind"].dispose()  # before the session's database is dropped


def test_status_without_redis_or_state_db_still_answers(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(redis_url="redis://127.0.0.1:1/0", broker_url="redis://127.0.0.1:1/1")
    use_env(monkeypatch, settings)
    code, out, _ = run_cli(monkeypatch, capsys, "status", "--json")
    st = json.loads(out)
    assert code == 0
    assert any(e.startswith("state db: no state database") for e in st["errors"])
    assert any(e.startswith("redis:") for e in st["errors"])
    assert any(e.startswith("broker:") for e in st["errors"])
    assert [e["name"] for e in st["schedule"]][0] == "incremental-scan"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_status_shows_fixes_by_state_with_the_oldest_age_of_each(
    backend: str, make_settings: Any, request: pytest.FixtureRequest
) -> None:
    """On-call sees at a glance what waits and for how long: a fix whose worker died
    shows as stalled until the resume tick takes it back, not as `fix 0`."""
    import io

    from worker.cli.state import show_status
    from worker.state.models import ActionRow

    overrides = {"practice": "test", "redis_url": "redis://127.0.0.1:1/0",
                 "broker_url": "redis://127.0.0.1:1/1"}
    if backend == "postgresql":
        overrides["state_db_url"] = request.getfixturevalue("pg_database")
        overrides["practice"] = "fix-states"
    settings = make_settings(**overrides)
    practice = settings.practice
    sessions = state_sessions(settings)
    now = T0 + timedelta(hours=1)
    lease = settings.fix_lease

    def action(key: str, status: str, created: datetime, **kw: Any) -> None:
        with sessions.begin() as s:
            row = finding(f"{practice}-{key}", "caregiver_link_missing", S.FIX_QUEUED,
                          at=created)
            row.practice = practice
            s.add(row)
            s.flush()
            s.add(ActionRow(practice=practice, finding_id=row.id, kind="refresh_source",
                            idempotency_key=f"{practice}-{key}", params={}, status=status,
                            created_at=created, **kw))

    action("q-old", "intent", now - timedelta(minutes=3, seconds=10))
    action("q-new", "intent", now - timedelta(seconds=5))
    action("claimed", "applying", now - timedelta(minutes=1), claimed_at=now - timedelta(
        seconds=12), lease_until=now - timedelta(seconds=12) + lease)
    action("dead", "applying", now - timedelta(minutes=2), claimed_at=now - timedelta(
        minutes=1), lease_until=now - timedelta(minutes=1) + lease)
    action("retry", "retrying", now - timedelta(minutes=2), claimed_at=now - timedelta(
        seconds=40), lease_until=now + timedelta(minutes=4))
    with sessions.begin() as s:
        held = finding(f"{practice}-held", "caregiver_link_missing", S.HELD,
                       at=now - timedelta(minutes=7, seconds=2),
                       next_check_at=now + timedelta(minutes=13))
        held.practice = practice
        s.add(held)
    try:
        out = io.StringIO()
        show_status(settings, as_json=True, now=now, out=out)
        fixes = json.loads(out.getvalue())["fixes"]
        assert fixes == {
            "queued": {"count": 2, "oldest_age_seconds": 190.0},
            "claimed": {"count": 1, "oldest_age_seconds": 12.0},
            "retrying": {"count": 1, "oldest_age_seconds": 40.0},
            "stalled": {"count": 1, "oldest_age_seconds": 15.0},
            "held": {"count": 1, "oldest_age_seconds": 422.0},
            "staged": {"count": 0, "oldest_age_seconds": None},
        }
        out = io.StringIO()
        show_status(settings, as_json=False, now=now, out=out)
        line = next(x for x in out.getvalue().splitlines() if x.startswith("fix states"))
        assert line == ("fix states queued 2 (oldest 3m10s) · claimed 1 (oldest 12s) · "
                        "retrying 1 (oldest 40s) · stalled 1 (oldest 15s) · "
                        "held 1 (oldest 7m02s) · staged 0")
    finally:
        sessions.kw["bind"].dispose()
