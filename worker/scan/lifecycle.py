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
from typing import cast

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from worker.model.findings import Finding, FixKind
from worker.model.scope import Scope
from worker.model.snapshot import Unknowns
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
    kept_unknown: int = 0  # not seen, but a row it rests on could not be read


# The tables under the ORM classes, for the Core statements that write in bulk.
_FINDINGS = cast(Table, FindingRow.__table__)
_EVENTS = cast(Table, FindingEvent.__table__)


class _Batch:
    """Changes to known rows and their events, written with one executemany each.

    On SQLite the ORM writes each dirty row and each new object in a statement of its own
    (it must learn every new id, and it does not trust executemany row counts), and a full
    scan touches every open finding. Rows are updated in memory as committed values, so
    the planner and the journal see them as if flushed.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self.rows: dict[int, dict[str, object]] = {}
        self.events: list[dict[str, object]] = []

    def set(self, row: FindingRow, **values: object) -> None:
        changes = self.rows.setdefault(row.id, {"id": row.id})
        for key, value in values.items():
            set_committed_value(row, key, value)
            changes[key] = value

    def write(self) -> None:
        """Core statements on the session's connection (same transaction): even the ORM's
        bulk UPDATE goes row by row on SQLite."""
        conn = self.session.connection()
        groups: dict[tuple[str, ...], list[dict[str, object]]] = {}
        for values in self.rows.values():
            groups.setdefault(tuple(sorted(values)), []).append(values)
        table = _FINDINGS
        for keys, rows in groups.items():
            columns = [k for k in keys if k != "id"]
            stmt = (
                update(table)
                .where(table.c.id == bindparam("_id"))
                .values({c: bindparam(c) for c in columns})
            )
            conn.execute(stmt, [{"_id": r["id"], **{c: r[c] for c in columns}} for r in rows])
        if self.events:
            conn.execute(insert(_EVENTS), self.events)


def transition(
    session: Session,
    row: FindingRow,
    to: S,
    now: datetime,
    cause: str,
    run_id: int | None,
    batch: _Batch | None = None,
) -> None:
    if row.state == to:
        return
    event = {"finding_id": row.id, "at": now, "from_state": row.state, "to_state": to,
             "cause": cause, "run_id": run_id}
    values: dict[str, object] = {"state": to, "state_changed_at": now}
    if to == S.RESOLVED:
        values.update(resolved_at=now, next_check_at=None)
    if batch is not None:
        batch.events.append(event)
        batch.set(row, **values)
        return
    session.add(FindingEvent(**event))
    for key, value in values.items():
        setattr(row, key, value)


def _load_rows(
    session: Session, practice: str, fingerprints: list[str], scope: Scope
) -> dict[str, FindingRow]:
    """Rows for the fingerprints seen now, plus every unresolved row the scope covers.

    Each row is built once: the unresolved rows first (a full scan sees most of them
    again), then only the fingerprints not among them (new, or resolved and back).
    """
    rows: dict[str, FindingRow] = {}
    unresolved = (FindingRow.practice == practice, FindingRow.state != S.RESOLVED)
    if scope.is_all:
        for r in session.scalars(select(FindingRow).where(*unresolved)):
            if scope.covers_check(r.check) and not scope.cedes(
                r.patient_id, r.contact_id, r.portal_user_id, r.contact_ids
            ):
                rows[r.fingerprint] = r
    else:
        # A narrow scope covers few of the unresolved rows: test their ids first and
        # build only the covered rows (building every row cost ~0.25 s at 10,000).
        ids = select(
            FindingRow.id, FindingRow.check, FindingRow.patient_id, FindingRow.contact_id,
            FindingRow.portal_user_id, FindingRow.contact_ids,
        ).where(*unresolved)
        covered = [
            r.id for r in session.execute(ids)
            if scope.covers_check(r.check) and r.check not in scope.keep_unseen
            and scope.covers(r.patient_id, r.contact_id, r.portal_user_id, r.contact_ids,
                             r.check)
        ]
        for i in range(0, len(covered), 500):
            q = select(FindingRow).where(FindingRow.id.in_(covered[i : i + 500]))
            rows.update({r.fingerprint: r for r in session.scalars(q)})
    missing = [fp for fp in fingerprints if fp not in rows]
    for i in range(0, len(missing), 500):
        q = select(FindingRow).where(
            FindingRow.practice == practice, FindingRow.fingerprint.in_(missing[i : i + 500])
        )
        rows.update({r.fingerprint: r for r in session.scalars(q)})
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
    *,
    unknown: Unknowns | None = None,
    blind: bool = False,
) -> SyncResult:
    """Fold the findings of one read into the state database (no commit).

    A finding not seen again is resolved, unless what it is about was unknown this run
    (`unknown`: a row naming it could not be read; `blind`: a row naming nothing could
    not be read, so any finding's evidence may be in it): absence is not evidence then.
    """
    current = {f.fingerprint: f for f in findings}
    known = _load_rows(session, practice, list(current), scope)
    result = SyncResult()
    new_rows: list[dict[str, object]] = []
    batch = _Batch(session)
    confirm_delay = rules.propagation_delay > timedelta(0)
    for fp, f in current.items():
        row = known.get(fp)
        if row is None:
            # The first state is set at the INSERT: no UPDATE per row after it.
            new_rows.append({
                "practice": practice,
                "fingerprint": fp,
                "check": f.check,
                "severity": str(f.severity),
                "state": S.PENDING if f.cross_system and confirm_delay else S.OPEN,
                "cross_system": f.cross_system,
                "fix": str(f.fix) if f.fix else None,
                "patient_id": f.patient_id,
                "contact_id": f.contact_id,
                "portal_user_id": f.portal_user_id,
                "contact_ids": list(f.contact_ids) or None,
                "detail": f.detail,
                "first_seen_at": now,
                "last_seen_at": now,
                "seen_count": 1,
                "state_changed_at": now,
                "last_run_id": run_id,
            })
            continue
        _seen_again(batch, row, f, now, rules, run_id, result)
        result.rows[fp] = row

    if new_rows:
        # One executemany (the ORM inserts row by row on SQLite to learn each id) and one
        # read back: a first full scan can raise tens of thousands.
        session.connection().execute(insert(_FINDINGS), new_rows)
        fresh = [str(r["fingerprint"]) for r in new_rows]
        for i in range(0, len(fresh), 500):
            q = select(FindingRow).where(
                FindingRow.practice == practice, FindingRow.fingerprint.in_(fresh[i : i + 500])
            )
            result.rows.update({r.fingerprint: r for r in session.scalars(q)})
        result.new += len(new_rows)
        causes = {
            S.PENDING: "first seen; a cross-system mismatch is confirmed by a read "
            f"{_minutes(rules.propagation_delay)} later",
            S.OPEN: "first seen",
        }
        batch.events.extend([
            {"finding_id": result.rows[fp].id, "at": now, "from_state": None,
             "to_state": result.rows[fp].state, "cause": causes[S(result.rows[fp].state)],
             "run_id": run_id}
            for fp in fresh
        ])

    for fp, row in known.items():
        if fp in current or row.state == S.RESOLVED:
            continue
        if row.check != "invalid_record" and (blind or (unknown is not None and unknown.touches(
                row.patient_id, row.contact_id, row.portal_user_id))):
            result.kept_unknown += 1
            continue
        _not_seen(batch, row, now, run_id, recent_ids, result)
    batch.write()
    session.flush()
    return result


def _seen_again(
    batch: _Batch,
    row: FindingRow,
    f: Finding,
    now: datetime,
    rules: TimeRules,
    run_id: int | None,
    result: SyncResult,
) -> None:
    seen: dict[str, object] = {"last_seen_at": now, "seen_count": row.seen_count + 1}
    # Only what differs is written: every open finding passes here on every full scan.
    if row.detail != f.detail:
        seen["detail"] = f.detail
    if row.severity != f.severity:
        seen["severity"] = str(f.severity)
    fix = str(f.fix) if f.fix else None
    if row.fix != fix:
        seen["fix"] = fix
    if row.last_run_id != run_id:
        seen["last_run_id"] = run_id
    batch.set(row, **seen)
    state = S(row.state)
    if state == S.RESOLVED:
        batch.set(row, first_seen_at=now, fix_attempts=0, resolved_at=None)
        to = S.PENDING if f.cross_system and rules.propagation_delay else S.OPEN
        transition(batch.session, row, to, now,
                   "reopened: seen again after it was resolved", run_id, batch)
        result.reopened += 1
    elif state == S.PENDING:
        if now - row.first_seen_at >= rules.propagation_delay:
            transition(
                batch.session, row, S.OPEN, now,
                f"confirmed: still present {_minutes(now - row.first_seen_at)} after first seen",
                run_id, batch,
            )
    elif state == S.SILENCED:
        if row.silenced_until is not None and now >= row.silenced_until:
            transition(batch.session, row, S.OPEN, now, "silence expired", run_id, batch)
            batch.set(row, silenced_until=None)
    elif state in (S.HELD, S.VERIFYING):
        if row.next_check_at is not None and now < row.next_check_at:
            return
        if row.fix_attempts <= rules.verify_max_retries:
            transition(
                batch.session, row, S.OPEN, now,
                f"verified after the hold: still present after fix attempt {row.fix_attempts}; "
                "will retry",
                run_id, batch,
            )
        else:
            transition(
                batch.session, row, S.ESCALATED, now,
                f"verified after the hold: still present after {row.fix_attempts} fix "
                "attempts; contact OP support",
                run_id, batch,
            )
            result.escalated += 1
        batch.set(row, next_check_at=None)


def _not_seen(
    batch: _Batch,
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
    transition(batch.session, row, S.RESOLVED, now, cause, run_id, batch)
    result.resolved += 1


def _minutes(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 60:g} min"
