"""Root cause first, and Self on any chart: what the planner and the digest do when an
OP-side problem makes a portal-side fix futile (worker.checks.rootcause).

Scenarios from the guide's wording. "Confirm there is no email address or N/A. If you
needed to ... clear their email address, wait a few minutes and then confirm that the
patient now shows under the parent/guardian Portal account": the step is in OP, and a
source refresh before it cannot help. "If a parent/guardian is also a patient ... and
already has an entry in their own Family Contacts with the Role/Reason listed as Self,
the Welcome email will not be sent": no resend either. freezegun drives the engine's
clock; the state database is SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from factory import (
    MemoryPortal,
    caregiver,
    contact,
    fc,
    patient,
    patient_user,
    source,
)
from freezegun import freeze_time
from sqlalchemy import select

from worker.checks.remedies import ESCALATION, REMEDIES
from worker.digest import build as b
from worker.fixes.apply import apply_action
from worker.model.records import Authority
from worker.scan.engine import Deps, reconcile, time_rules
from worker.scan.planner import Decision
from worker.scan.wiring import state_sessions
from worker.state.models import DigestSent, FindingRow
from worker.state.models import FindingState as S

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
FD = "frontdesk@example.org"


def deps_for(settings: Any, portal: MemoryPortal, backend: str, request: Any) -> Deps:
    deps = Deps(settings, state_sessions(settings), portal, portal, portal_writable=True)
    if backend == "postgresql":
        deps.sessions = request.getfixturevalue("pg_sessions")
    return deps


def scan_at(deps: Deps, when: datetime) -> Any:
    with freeze_time(when):
        result = reconcile(deps, kind="full")
        for action_id in result.action_ids:
            apply_action(deps.sessions, deps.portal, action_id, time_rules(deps.settings),
                         op=deps.op)
    return result


def items(result: Any) -> dict[str, Any]:
    return {i.finding.check: i for i in result.plan.items}


def teen_with_chart_email(email: str = "teen@example.org") -> MemoryPortal:
    """Chart P1 holds a real email; mother C1 (Joint) has portal user U1, the child U2,
    and the portal does not link them. A refresh would link them (if it could help)."""
    return MemoryPortal([
        patient("P1", email=email), contact("C1"), fc("P1", "C1"),
        caregiver("U1", "C1"), patient_user("U2", "P1"), source("U1"),
    ], {"U1": ["U2"]})


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_chart_email_holds_back_the_refresh_instead_of_escalating(
    backend: str, make_settings: Any, request: pytest.FixtureRequest
) -> None:
    portal = teen_with_chart_email()
    deps = deps_for(make_settings(), portal, backend, request)
    scan_at(deps, T0)
    # Confirmed after the propagation delay, then the 20/40/80-minute marks a refresh
    # would have been verified and retried at, and long after: it waits, never escalates.
    for minutes in (15, 35, 75, 155, 600):
        plan = items(scan_at(deps, T0 + timedelta(minutes=minutes)))
        link = plan["caregiver_link_missing"]
        assert link.decision is Decision.WAIT, (minutes, link.reason)
        assert "root cause first: patient_email_present (chart P1)" in link.reason
        assert plan["patient_email_present"].decision is Decision.ALERT
    assert portal.calls == []
    with deps.sessions() as s:
        row = s.scalars(select(FindingRow).where(
            FindingRow.check == "caregiver_link_missing")).one()
        assert row.state == S.OPEN and row.fix_attempts == 0

    # The front desk clears the chart's email: the refresh goes ahead once OP's change
    # has had the propagation delay to reach the portal.
    cleared = T0 + timedelta(minutes=601)
    portal.records = [patient("P1", email="N/A", updated_at=cleared) if
                      getattr(r, "patient_id", None) == "P1" and type(r).__name__ == "Patient"
                      else r for r in portal.records]
    assert "caregiver_link_missing" not in items(scan_at(deps, cleared + timedelta(minutes=1)))
    fixed = items(scan_at(deps, cleared + timedelta(minutes=16)))
    assert fixed["caregiver_link_missing"].decision is Decision.FIX
    assert [c[0] for c in portal.calls] == ["refresh_source"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_silenced_blocker_no_longer_holds_back_the_fix(
    backend: str, make_settings: Any, request: pytest.FixtureRequest
) -> None:
    """Staff may decide to live with an OP-side problem (a silence, or the check off):
    then the portal fix is worth trying again."""
    settings = make_settings(policies={"patient_email_present": "off"})
    deps = deps_for(settings, teen_with_chart_email(), backend, request)
    scan_at(deps, T0)
    assert items(scan_at(deps, T0 + timedelta(minutes=15)))[
        "caregiver_link_missing"].decision is Decision.FIX


def test_each_blocker_holds_back_the_fixes_of_its_family(make_settings: Any) -> None:
    """Family: the chart and the family contacts on it. An inactive second contact on
    P1 (often a duplicate of the parent) holds back the refresh for P1; the same
    mother's link to her other child P2, whose chart is in order, does not wait."""
    portal = MemoryPortal([
        patient("P1"), patient("P2"), contact("C1"), contact("C9", active=False),
        fc("P1", "C1"), fc("P2", "C1"), fc("P1", "C9", role="Father"),
        caregiver("U1", "C1"), patient_user("U2", "P1"), patient_user("U3", "P2"),
        source("U1"),
    ], {"U1": ["U2", "U3"]})
    deps = Deps(make_settings(), state_sessions(make_settings()), portal, portal,
                portal_writable=True)
    scan_at(deps, T0)
    result = scan_at(deps, T0 + timedelta(minutes=15))
    links = {i.finding.patient_id: i for i in result.plan.items
             if i.finding.check == "caregiver_link_missing"}
    assert links["P1"].decision is Decision.WAIT
    assert "contact_inactive (chart P1, contact C9)" in links["P1"].reason
    assert links["P2"].decision is Decision.FIX


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_self_row_on_another_chart_blocks_the_welcome_and_no_resend_is_planned(
    backend: str, make_settings: Any, request: pytest.FixtureRequest
) -> None:
    """C2 is mother (Joint) of P1 and has no portal account. Her contact record does not
    say she is a patient, but chart A1 lists her with Role/Reason Self: she *is* A1, and
    the Welcome email will not be sent. self_role is raised and no resend is planned."""
    portal = MemoryPortal([
        patient("P1"), contact("C2"), fc("P1", "C2"),
        patient("A1", email="mom@example.org"), fc("A1", "C2", role="Self"),
    ])
    deps = deps_for(make_settings(), portal, backend, request)
    scan_at(deps, T0)
    plan = items(scan_at(deps, T0 + timedelta(minutes=15)))
    assert (plan["self_role"].finding.patient_id, plan["self_role"].finding.contact_id) == (
        "A1", "C2")
    welcome = plan["welcome_not_sent"]
    assert welcome.decision is Decision.WAIT
    assert "root cause first: self_role (chart A1, contact C2)" in welcome.reason
    assert portal.calls == []


def test_the_digest_names_the_blocker_as_the_step_to_take(make_settings: Any) -> None:
    """The front desk's digest lists the waiting link with the chart-email steps, not
    "oprecon refreshes automatically ... contact OP support"."""
    settings = make_settings(digest_recipients={"front_desk": [FD]})
    portal = teen_with_chart_email()
    deps = Deps(settings, state_sessions(settings), portal, portal, portal_writable=True)
    scan_at(deps, T0)
    scan_at(deps, T0 + timedelta(minutes=15))
    [recipient] = b.resolve_recipients(settings)
    day = T0 + timedelta(days=1)
    with freeze_time(day), deps.sessions() as s, s.begin():
        window = b.latest_closed_daily(settings, day)
        earlier = b.daily_window(window.day - timedelta(days=2), settings)  # type: ignore[operator]
        s.add(DigestSent(practice=settings.practice, recipient=recipient.key,
                         window_key=earlier.key, status="sent", created_at=T0, sent_at=T0))
    with deps.sessions() as s:
        digest = b.build_daily(s, settings, recipient, window, day)
    listed = {i.check: i for g in digest.groups for i in g.items}
    steps = listed["caregiver_link_missing"].steps
    assert "Child's chart has a real email" in steps[0] and "chart P1" in steps[0]
    assert set(REMEDIES["patient_email_present"]) <= set(steps)
    assert not set(REMEDIES["caregiver_link_missing"]) & set(steps)
    assert not any("OP support" in step for step in steps)
    assert listed["patient_email_present"].steps == REMEDIES["patient_email_present"]


def test_an_escalated_fix_with_an_open_blocker_points_at_the_blocker(make_settings: Any) -> None:
    """A fix escalated before the blocker appeared (the chart got its email later): the
    notice names the chart email, not OP support."""
    settings = make_settings(digest_recipients={"front_desk": [FD]})
    sessions = state_sessions(settings)
    with sessions() as s, s.begin():
        for check, state, pid, cid in (
            ("caregiver_link_missing", S.ESCALATED, "P1", "C1"),
            ("patient_email_present", S.OPEN, "P1", None),
        ):
            s.add(FindingRow(practice="test", fingerprint=f"{check}:x", check=check,
                             severity="warning", state=state, patient_id=pid, contact_id=cid,
                             detail="", first_seen_at=T0, last_seen_at=T0,
                             state_changed_at=T0))
    [recipient] = b.resolve_recipients(settings)
    window = b.Window(f"immediate:caregiver_link_missing:x:{b.stamp(T0)}", "immediate", T0,
                      ref="caregiver_link_missing:x")
    with sessions() as s:
        digest = b.build_immediate(s, settings, recipient, window, T0)
    assert digest is not None
    [item] = digest.groups[0].items
    assert item.steps != ESCALATION and "Child's chart has a real email" in item.steps[0]


def test_a_parent_without_authority_elsewhere_still_gets_no_finding() -> None:
    """A self-managing adult (Self on their own chart, authorized nowhere else) is normal,
    even when the contact record does not name the chart."""
    from worker.checks import CheckContext, run_checks
    from worker.model.snapshot import Snapshot

    snap = Snapshot.build([patient("A1", email="adult@example.org"), contact("CA"),
                           fc("A1", "CA", role="Self", authority=Authority.NONE),
                           patient("P1"), contact("C1"), fc("P1", "C1")])
    found = {f.check for f in run_checks(CheckContext(snap, T0))}
    assert not found & {"self_role", "self_dependent_missing"}
