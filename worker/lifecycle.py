"""The finding lifecycle: what one read of both systems does to the findings we hold.

open → fix_queued → held → (verified at hold end) → resolved | open again (retry) |
escalated; plus pending (a cross-system mismatch seen once, confirmed only by a read at
least the propagation delay later), silenced, and reopened. Every transition writes a
`FindingEvent` with its time and cause.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.findings import Finding, FixKind
from worker.scope import Scope
from worker.state.models import FindingEvent, FindingRow
from worker.state.models import FindingState as S


@dataclass(frozen=True)
class TimeRules:
    propagation_delay: timedelta = timedelta(minutes=15)
    hold: timedelta = timedelta(minutes=15)
    source_refresh_hold: timedelta = timedelta(minutes=20)
    verify_max_retries: int = 2

    def hold_for(self, fix: str | None, attempt: int) -> timedelta:
        """Hold after fix attempt `attempt` (1-based): doubles with each retry."""
        base = self.source_refresh_hold if fix == FixKind.REFRESH_SOURCE else self.hold
        return base * (2 ** max(0, attempt - 1))


@dataclass
class SyncResult:
    rows: dict[str, FindingRow] = field(default_factory=dict)  # fingerprint → row (seen now)
    new: int = 0
    reopened: int = 0
    resolved: int = 0
    escalated: int = 0
    kept_waiting: int = 0  # not seen, but an OP record involved changed too recently


def transition(
    session: Session,
    row: FindingRow,
    to: S,
    now: datetime,
    cause: str,
    run_id: int | None,
) -> None:
    if row.state == to:
        return
    session.add(
        FindingEvent(
            finding_id=row.id,
            at=now,
            from_state=row.state,
            to_state=to,
            cause=cause,
            run_id=run_id,
        )
    )
    row.state = to
    row.state_changed_at = now
    if to == S.RESOLVED:
        row.resolved_at = now
        row.next_check_at = None


def _load_rows(
    session: Session, practice: str, fingerprints: list[str], scope: Scope
) -> dict[str, FindingRow]:
    """Rows for the fingerprints seen now, plus every unresolved row the scope covers."""
    rows: dict[str, FindingRow] = {}
    for i in range(0, len(fingerprints), 500):
        chunk = fingerprints[i : i + 500]
        q = select(FindingRow).where(
            FindingRow.practice == practice, FindingRow.fingerprint.in_(chunk)
        )
        rows.update({r.fingerprint: r for r in session.scalars(q)})
    q = select(FindingRow).where(
        FindingRow.practice == practice, FindingRow.state != S.RESOLVED
    )
    for r in session.scalars(q):
        if scope.covers(r.patient_id, r.contact_id, r.portal_user_id, r.contact_ids):
            rows.setdefault(r.fingerprint, r)
    return rows


def sync(
    session: Session,
    practice: str,
    findings: Iterable[Finding],
    scope: Scope,
    now: datetime,
    rules: TimeRules,
    run_id: int | None,
    recent_ids: frozenset[str] = frozenset(),
) -> SyncResult:
    """Fold the findings of one read into the state database (no commit)."""
    current = {f.fingerprint: f for f in findings}
    known = _load_rows(session, practice, list(current), scope)
    result = SyncResult()
    new_rows = []
    for fp, f in current.items():
        row = known.get(fp)
        if row is None:
            row = FindingRow(
                practice=practice,
                fingerprint=fp,
                check=f.check,
                severity=str(f.severity),
                state=S.OPEN,
                cross_system=f.cross_system,
                fix=str(f.fix) if f.fix else None,
                patient_id=f.patient_id,
                contact_id=f.contact_id,
                portal_user_id=f.portal_user_id,
                contact_ids=list(f.contact_ids) or None,
                detail=f.detail,
                first_seen_at=now,
                last_seen_at=now,
                seen_count=1,
                state_changed_at=now,
                last_run_id=run_id,
            )
            new_rows.append((row, f))
            result.rows[fp] = row
            result.new += 1
            continue
        _seen_again(session, row, f, now, rules, run_id, result)
        result.rows[fp] = row

    if new_rows:
        session.add_all([r for r, _ in new_rows])
        session.flush()
        for row, f in new_rows:
            confirm_later = f.cross_system and rules.propagation_delay > timedelta(0)
            to = S.PENDING if confirm_later else S.OPEN
            cause = (
                "first seen; a cross-system mismatch is confirmed by a read "
                f"{_minutes(rules.propagation_delay)} later"
                if confirm_later
                else "first seen"
            )
            session.add(
                FindingEvent(
                    finding_id=row.id, at=now, from_state=None, to_state=to, cause=cause,
                    run_id=run_id,
                )
            )
            row.state = to

    for fp, row in known.items():
        if fp in current or row.state == S.RESOLVED:
            continue
        _not_seen(session, row, now, run_id, recent_ids, result)
    session.flush()
    return result


def _seen_again(
    session: Session,
    row: FindingRow,
    f: Finding,
    now: datetime,
    rules: TimeRules,
    run_id: int | None,
    result: SyncResult,
) -> None:
    row.last_seen_at = now
    row.seen_count += 1
    row.detail = f.detail
    row.severity = str(f.severity)
    row.fix = str(f.fix) if f.fix else None
    row.last_run_id = run_id
    state = S(row.state)
    if state == S.RESOLVED:
        row.first_seen_at = now
        row.fix_attempts = 0
        row.resolved_at = None
        to = S.PENDING if f.cross_system and rules.propagation_delay else S.OPEN
        transition(session, row, to, now, "reopened: seen again after it was resolved", run_id)
        result.reopened += 1
    elif state == S.PENDING:
        if now - row.first_seen_at >= rules.propagation_delay:
            transition(
                session, row, S.OPEN, now,
                f"confirmed: still present {_minutes(now - row.first_seen_at)} after first seen",
                run_id,
            )
    elif state == S.SILENCED:
        if row.silenced_until is not None and now >= row.silenced_until:
            transition(session, row, S.OPEN, now, "silence expired", run_id)
            row.silenced_until = None
    elif state in (S.HELD, S.VERIFYING):
        if row.next_check_at is not None and now < row.next_check_at:
            return
        if row.fix_attempts <= rules.verify_max_retries:
            transition(
                session, row, S.OPEN, now,
                f"verified after the hold: still present after fix attempt {row.fix_attempts}; "
                "will retry",
                run_id,
            )
        else:
            transition(
                session, row, S.ESCALATED, now,
                f"verified after the hold: still present after {row.fix_attempts} fix "
                "attempts; contact OP support",
                run_id,
            )
            result.escalated += 1
        row.next_check_at = None


def _not_seen(
    session: Session,
    row: FindingRow,
    now: datetime,
    run_id: int | None,
    recent_ids: frozenset[str],
    result: SyncResult,
) -> None:
    if row.cross_system and (
        (row.patient_id and row.patient_id in recent_ids)
        or (row.contact_id and row.contact_id in recent_ids)
    ):
        result.kept_waiting += 1
        return  # the portal may still be catching up with that change
    if row.state == S.HELD and row.next_check_at is not None and now < row.next_check_at:
        return  # verified when the hold ends, not before
    cause = (
        "verified after the hold: fixed"
        if row.state in (S.HELD, S.VERIFYING)
        else "no longer found"
    )
    transition(session, row, S.RESOLVED, now, cause, run_id)
    result.resolved += 1


def _minutes(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 60:g} min"
