"""The propagation rules and the finding lifecycle, at their exact time boundaries.

freezegun drives the clock of the engine (no Celery or kombu in these tests)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from factory import MemoryPortal, MemorySource, clean_family, patient
from freezegun import freeze_time
from sqlalchemy import select

from worker.fixes.apply import apply_action
from worker.scan.engine import Deps, ScopeRequest, reconcile, time_rules
from worker.scan.planner import Decision
from worker.scan.wiring import state_sessions
from worker.state.models import ActionRow, FindingEvent, FindingRow

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
MISSING_LINK = "caregiver_link_missing"


def deps_for(settings: Any, portal: MemorySource, op: MemorySource | None = None) -> Deps:
    return Deps(settings, state_sessions(settings), op or portal, portal,
                portal_writable=portal.writable)


def missing_link_practice(fixable: bool = True) -> MemoryPortal:
    """The clean family without its caregiver link; a refresh restores it (if fixable)."""
    records = [r for r in clean_family() if type(r).__name__ != "CaregiverLink"]
    return MemoryPortal(records, {"U1": ["U2"]} if fixable else {})


def decisions(result: Any) -> dict[str, Decision]:
    return {i.finding.check: i.decision for i in result.plan.items}


def scan_at(deps: Deps, when: datetime, **kw: Any) -> Any:
    with freeze_time(when):
        result = reconcile(deps, kind="full", **kw)
        for action_id in result.action_ids:
            apply_action(deps.sessions, deps.portal, action_id, time_rules(deps.settings),
                         op=deps.op)
    return result


def finding_row(deps: Deps, check: str) -> FindingRow:
    with deps.sessions() as s:
        return s.scalars(select(FindingRow).where(FindingRow.check == check)).one()


def test_cross_system_mismatch_needs_two_reads_the_delay_apart(make_settings: Any) -> None:
    deps = deps_for(make_settings(), missing_link_practice())
    assert decisions(scan_at(deps, T0))[MISSING_LINK] is Decision.WAIT
    late = T0 + timedelta(minutes=14, seconds=59)
    assert decisions(scan_at(deps, late))[MISSING_LINK] is Decision.WAIT
    assert decisions(scan_at(deps, T0 + timedelta(minutes=15)))[MISSING_LINK] is Decision.FIX


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_fix_is_held_then_verified_resolved(make_settings: Any, backend: str,
                                            request: pytest.FixtureRequest) -> None:
    portal = missing_link_practice()
    deps = deps_for(make_settings(), portal)
    if backend == "postgresql":
        deps.sessions = request.getfixturevalue("pg_sessions")
    scan_at(deps, T0)
    applied_at = T0 + timedelta(minutes=15)
    scan_at(deps, applied_at)
    assert [c[0] for c in portal.calls] == ["refresh_source"]
    row = finding_row(deps, MISSING_LINK)
    assert row.state == "held"
    assert row.next_check_at == applied_at + timedelta(minutes=20)  # source refresh: 20 min
    # The link is back at once here, but the finding stays held until the hold ends.
    just_before = applied_at + timedelta(minutes=19, seconds=59)
    assert decisions(scan_at(deps, just_before)) == {}
    assert finding_row(deps, MISSING_LINK).state == "held"
    scan_at(deps, applied_at + timedelta(minutes=20))
    row = finding_row(deps, MISSING_LINK)
    assert row.state == "resolved"
    with deps.sessions() as s:
        causes = [e.cause for e in s.scalars(select(FindingEvent).order_by(FindingEvent.id))]
    assert causes[-1] == "verified after the hold: fixed"
    assert len(portal.calls) == 1  # no second fix during or after the hold


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_unfixed_finding_is_retried_with_growing_holds_then_escalated(
    make_settings: Any, backend: str, request: pytest.FixtureRequest
) -> None:
    portal = missing_link_practice(fixable=False)
    deps = deps_for(make_settings(verify_max_retries=2), portal)
    if backend == "postgresql":
        deps.sessions = request.getfixturevalue("pg_sessions")
    scan_at(deps, T0)
    t = T0 + timedelta(minutes=15)
    holds = []
    for _ in range(3):
        scan_at(deps, t)
        row = finding_row(deps, MISSING_LINK)
        assert row.state == "held"
        holds.append(row.next_check_at - t)
        t = row.next_check_at
    assert holds == [timedelta(minutes=20), timedelta(minutes=40), timedelta(minutes=80)]
    result = scan_at(deps, t)
    assert decisions(result)[MISSING_LINK] is Decision.ESCALATED
    assert finding_row(deps, MISSING_LINK).state == "escalated"
    assert len(portal.calls) == 3
    scan_at(deps, t + timedelta(hours=5))
    assert len(portal.calls) == 3  # escalated findings are never fixed again


def test_hold_for_an_email_fix_is_15_minutes(make_settings: Any) -> None:
    records = clean_family()
    from factory import patient_user

    records[4] = patient_user("U2", "P1", email="kid@gmail.com")
    portal = MemoryPortal(records)
    deps = deps_for(make_settings(), portal)
    scan_at(deps, T0)
    scan_at(deps, T0 + timedelta(minutes=15))
    row = finding_row(deps, "portal_patient_email_not_dummy")
    assert row.next_check_at == T0 + timedelta(minutes=30)
    assert portal.get_user("U2").email.endswith("@dummy.com")  # type: ignore[union-attr]


def test_resolved_then_seen_again_is_reopened(make_settings: Any) -> None:
    base = clean_family()
    bad = [*base[1:], patient("P1", email="kid@example.org")]
    source = MemorySource(bad)
    deps = deps_for(make_settings(), source)
    scan_at(deps, T0)
    source.records = base
    scan_at(deps, T0 + timedelta(hours=1))
    assert finding_row(deps, "patient_email_present").state == "resolved"
    source.records = bad
    scan_at(deps, T0 + timedelta(hours=2))
    row = finding_row(deps, "patient_email_present")
    assert row.state == "open"
    with deps.sessions() as s:
        causes = [e.cause for e in s.scalars(select(FindingEvent))]
    assert any(c.startswith("reopened") for c in causes)


def test_silence_expires_at_its_time(make_settings: Any) -> None:
    bad = [*clean_family()[1:], patient("P1", email="kid@example.org")]
    deps = deps_for(make_settings(), MemorySource(bad))
    scan_at(deps, T0)
    until = T0 + timedelta(days=1)
    with deps.sessions() as s, s.begin():
        row = s.scalars(select(FindingRow)).one()
        row.state, row.silenced_until, row.silenced_by, row.silence_reason = (
            "silenced", until, "test", "family asked us to wait")
    before = scan_at(deps, until - timedelta(seconds=1))
    assert decisions(before)["patient_email_present"] is Decision.SILENCED
    after = scan_at(deps, until)
    assert decisions(after)["patient_email_present"] is Decision.ALERT


def test_recent_op_change_keeps_a_cross_system_finding_waiting(make_settings: Any) -> None:
    """A finding not seen because its OP record just changed is not declared resolved."""
    portal = missing_link_practice(fixable=False)
    deps = deps_for(make_settings(), portal)
    scan_at(deps, T0)
    from dataclasses import replace

    changed = T0 + timedelta(minutes=5)
    portal.records = [replace(r, updated_at=changed) if type(r).__name__ == "Contact" else r
                      for r in portal.records]
    scan_at(deps, changed + timedelta(minutes=1))
    assert finding_row(deps, MISSING_LINK).state == "pending"


def test_dry_run_leaves_the_state_database_byte_for_byte(make_settings: Any,
                                                          tmp_path: Path) -> None:
    settings = make_settings()
    portal = missing_link_practice()
    deps = deps_for(settings, portal)
    scan_at(deps, T0)
    db = Path(settings.state_db_url.removeprefix("sqlite:///"))
    state_sessions(settings).kw["bind"].dispose()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    with freeze_time(T0 + timedelta(minutes=30)):
        result = reconcile(deps, ScopeRequest(), dry_run=True)
    assert decisions(result)[MISSING_LINK] is Decision.FIX  # it would fix…
    assert result.action_ids == [] and portal.calls == []  # …but changed nothing
    state_sessions(settings).kw["bind"].dispose()
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    with deps.sessions() as s:
        assert s.scalars(select(ActionRow)).all() == []
