"""Staged fix batches: what staff do after the mass-change guard held a run's fixes back.

The guard (worker.scan.planner) stages every fix of a run that would change an unusual
number of records, and the engine records one alert for the batch (kv "guard"). Staff
then look at it and run `oprecon fixes approve RUN` or `oprecon fixes reject RUN`.
"""

from __future__ import annotations

import getpass
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings, SettingsError
from worker.scan.engine import coalesce_intent, time_rules, utcnow
from worker.scan.lifecycle import transition
from worker.state.db import kv_get, kv_set
from worker.state.models import ActionRow, ActionStatus, FindingEvent, FindingRow
from worker.state.models import FindingState as S

log = structlog.get_logger(__name__)

Mode = Literal["auto", "queue", "local"]
# A staged fix is released only while its finding is open and waiting for it.
_RELEASABLE = (S.OPEN,)
_LIVE = (ActionStatus.INTENT, ActionStatus.RETRYING)


def release_staged(
    settings: Settings,
    run_id: int,
    approve: bool,
    *,
    by: str | None = None,
    mode: Mode = "auto",
    sessions: sessionmaker[Session] | None = None,
    echo: Callable[[str], None] = print,
    now: datetime | None = None,
    enqueue: Callable[[Settings, list[int]], None] | None = None,
    op: Any = None,
) -> int:
    """Approve or reject the fixes the mass-change guard staged in run `run_id`.

    approve: each staged fix whose finding is still open becomes an intent (the finding
    goes to fix_queued, with an event naming who approved it) and is committed first.
    Fixes are coalesced as a scan coalesces them (worker.scan.engine.coalesce_intent):
    a source refresh for a portal user whose refresh is already released, queued,
    running or in its hold makes no call of its own and is verified with that one.
    Then, with mode "auto" (the CLI), the fixes are queued on the worker's `fix` queue
    when the broker answers, so they go through the same rate limit, breaker and
    retries as every other fix; if it does not answer they are applied here, one by
    one, with the same guard. "queue" and "local" force one way. `enqueue(settings,
    ids)` queues them (the CLI passes worker.runtime.dispatch.send_fixes); without it
    "auto" applies here. A fix whose finding
    was resolved, silenced or fixed otherwise meanwhile is dropped (rejected) with why.

    reject: the staged fixes are marked rejected and nothing is applied; the findings
    stay open, so staff keep being alerted about them, and are not re-staged for this
    attempt.

    `op` is the OP reader a Welcome resend applied here reads the address from (default:
    the configured OP source).

    Prints one line; returns how many staged fixes were released (or rejected).
    """
    at = now or utcnow()
    who = by or _operator()
    if sessions is None:
        from worker.scan.wiring import state_sessions

        sessions = state_sessions(settings)
    verb = "approved" if approve else "rejected"
    with sessions() as session, session.begin():
        rows = list(
            session.scalars(
                select(ActionRow)
                .where(
                    ActionRow.practice == settings.practice,
                    ActionRow.run_id == run_id,
                    ActionRow.status == ActionStatus.STAGED,
                )
                .order_by(ActionRow.id)
                .with_for_update()
            )
        )
        if not rows:
            echo(f"run {run_id}: no staged fixes to {'approve' if approve else 'reject'}")
            return 0
        released: list[int] = []
        served = 0
        dropped = 0
        for action in rows:
            finding = session.get(FindingRow, action.finding_id)
            assert finding is not None
            if not approve:
                _reject(session, action, finding, at, run_id, f"rejected by {who}")
                continue
            why_not = _not_releasable(session, action, finding)
            if why_not:
                _reject(session, action, finding, at, run_id, why_not, event=False)
                dropped += 1
                continue
            action.status = ActionStatus.INTENT
            session.flush()  # visible to the coalescing of the fixes released after it
            approved = f"staged fix {action.kind} approved by {who} (mass-change guard, run " \
                       f"{run_id})"
            if coalesce_intent(session, action, finding, at, run_id,
                               because=approved) is not None:
                served += 1  # one call per portal user, as in a scan
                continue
            transition(session, finding, S.FIX_QUEUED, at, approved, run_id)
            released.append(action.id)
        _settle_guard(session, settings.practice, run_id, verb, who, at)
    log.info("staged_batch_" + verb, run_id=run_id, fixes=len(rows), by=who)

    if not approve:
        echo(f"run {run_id}: rejected {len(rows)} staged fix(es); nothing was applied and "
             "their findings stay open for staff")
        return len(rows)
    skipped = f"; {dropped} dropped (finding no longer waiting)" if dropped else ""
    if served:
        skipped += (f"; {served} served by another fix for the same portal user (one call "
                    "per user)")
    if not released and served:
        echo(f"run {run_id}: approved {served} staged fix(es){skipped}")
        return served
    if not released:
        echo(f"run {run_id}: approved, but none of {len(rows)} staged fix(es) is still "
             f"needed{skipped}")
        return 0
    approved_n = len(released) + served
    if mode != "local" and _enqueue(enqueue, settings, released, required=mode == "queue"):
        echo(f"run {run_id}: approved {approved_n} staged fix(es){skipped}; queued on the "
             f"worker's fix queue as action(s) {_ids(released)}")
        return approved_n
    outcome = _apply_here(settings, sessions, released, lambda: now or utcnow(), op)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(outcome.items()))
    echo(f"run {run_id}: approved {approved_n} staged fix(es){skipped}; applied here: "
         f"{summary}")
    return approved_n


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "an operator"


def _ids(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids)


def _not_releasable(session: Session, action: ActionRow, finding: FindingRow) -> str | None:
    if finding.state not in _RELEASABLE:
        return f"not applied: its finding is {finding.state} at approval"
    other = session.scalar(
        select(ActionRow.id).where(
            ActionRow.finding_id == finding.id,
            ActionRow.id != action.id,
            ActionRow.status.in_(_LIVE),
        )
    )
    if other is not None:
        return f"not applied: action {other} already fixes its finding"
    return None


def _reject(
    session: Session, action: ActionRow, finding: FindingRow, now: datetime, run_id: int,
    why: str, *, event: bool = True,
) -> None:
    action.status = ActionStatus.REJECTED
    action.error = why
    if event:
        # The finding keeps its state (open: staff are alerted); the trail says why.
        session.add(FindingEvent(
            finding_id=finding.id, at=now, from_state=finding.state, to_state=finding.state,
            cause=f"staged fix {action.kind} {why} (mass-change guard, run {run_id})",
            run_id=run_id,
        ))


def _settle_guard(
    session: Session, practice: str, run_id: int, verb: str, who: str, now: datetime
) -> None:
    """Close the guard's alert for this batch so digests stop asking for a decision."""
    guard = kv_get(session, practice, "guard")
    if guard is not None and guard.get("run_id") == run_id:
        guard.update(status=verb, by=who, decided_at=now.isoformat())
        kv_set(session, practice, "guard", guard, now)


def _enqueue(
    enqueue: Callable[[Settings, list[int]], None] | None, settings: Settings, ids: list[int],
    *, required: bool,
) -> bool:
    """Queue the fixes through `enqueue`; False (or raise, if required) when there is no
    queue or the broker does not answer. The intents are already committed, so the
    periodic resume task would pick them up even if this never ran."""
    try:
        if enqueue is None:
            raise RuntimeError("no fix queue configured")
        enqueue(settings, ids)
    except Exception as err:  # noqa: BLE001 — any broker failure means "apply here"
        if required:
            raise RuntimeError(f"cannot queue the fixes: broker unreachable ({err})") from err
        log.warning("staged_fixes_not_queued", error=type(err).__name__)
        return False
    return True


def _apply_here(
    settings: Settings, sessions: sessionmaker[Session], ids: list[int],
    now: Callable[[], datetime], op: Any = None,
) -> Counter[str]:
    """Apply in this process, through the same guard as the worker; a transient failure
    leaves the fix `retrying` for the worker's resume task."""
    from worker.fixes.apply import TransientPortalError, apply_action
    from worker.fixes.rails import portal_guard
    from worker.scan.wiring import op_reader, portal_adapter

    portal = portal_adapter(settings)
    if op is None:
        try:
            op = op_reader(settings)
        except SettingsError:  # only a Welcome resend needs OP; without it, it says so
            op = None
    guard = portal_guard(settings, sessions=sessions)
    rules = time_rules(settings)
    outcome: Counter[str] = Counter()
    for action_id in ids:
        try:
            outcome[apply_action(sessions, portal, action_id, rules, guard=guard, now=now,
                                         op=op, lease=settings.fix_lease)] += 1
        except TransientPortalError:
            outcome["retrying"] += 1
    return outcome


# -- what staff look at before deciding ----------------------------------------------------


def staged_batches(session: Session, practice: str) -> list[dict[str, Any]]:
    """Every run with fixes still staged: run id, how many, by kind, since when, and the
    guard's reason when it is the batch the alert is about."""
    rows = session.execute(
        select(ActionRow.run_id, ActionRow.kind, func.count(), func.min(ActionRow.created_at))
        .where(ActionRow.practice == practice, ActionRow.status == ActionStatus.STAGED)
        .group_by(ActionRow.run_id, ActionRow.kind)
    ).all()
    guard = kv_get(session, practice, "guard") or {}
    batches: dict[int, dict[str, Any]] = {}
    for run_id, kind, count, since in rows:
        batch = batches.setdefault(int(run_id), {
            "run_id": int(run_id), "staged": 0, "kinds": {}, "since": since,
            "reason": guard.get("reason") if guard.get("run_id") == run_id else None,
        })
        batch["staged"] += count
        batch["kinds"][str(kind)] = count
        batch["since"] = min(batch["since"], since)
    return sorted(batches.values(), key=lambda b: b["run_id"])


def staged_fixes(session: Session, practice: str, run_id: int) -> list[dict[str, Any]]:
    """The staged fixes of one run with their findings: ids only, never an address."""
    rows = session.execute(
        select(ActionRow, FindingRow)
        .join(FindingRow, FindingRow.id == ActionRow.finding_id)
        .where(ActionRow.practice == practice, ActionRow.run_id == run_id,
               ActionRow.status == ActionStatus.STAGED)
        .order_by(ActionRow.id)
    ).all()
    return [{
        "action_id": action.id, "run_id": run_id, "kind": action.kind,
        "check": finding.check, "fingerprint": finding.fingerprint,
        "finding_state": finding.state, "patient_id": finding.patient_id,
        "contact_id": finding.contact_id, "portal_user_id": finding.portal_user_id,
        "staged_at": action.created_at.isoformat(),
    } for action, finding in rows]
