"""The claim on a fix: who may call the portal for it, until when, and whether they did.

A fix goes `intent` (or `retrying`) → `applying` in one conditional UPDATE whose row count
says who won; the winner holds a lease (`lease_until`) under its Celery task id
(`claimed_by`) and a token unique to this one execution (`claim_token`: a message the
broker redelivers keeps its task id). Every later write of the holder names the token,
so a holder that lost its claim (its lease lapsed and another task took over) changes
nothing. Plain UPDATE … WHERE with a row-count check behaves the same on SQLite (writes
are serialised) and PostgreSQL (the second UPDATE waits for the first and re-checks the
WHERE on the committed row), so no `SELECT … FOR UPDATE` is needed.

Just before the portal call the holder sets `called_at` (again under its token). A claim
that lapses with `called_at` set may have reached the portal: whoever takes it over
*recovers* (re-reads, never calls). One that lapses without it never called: taking it
over is a plain new attempt.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Executable, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from worker.state.models import ActionRow, ActionStatus, FindingRow, FindingState

A = ActionStatus
# Statuses nobody works on any more (coalesced: its primary fix does the work).
FINAL = frozenset({A.APPLIED, A.ALREADY, A.FAILED, A.REJECTED, A.UNAVAILABLE,
                   A.UNCONFIRMED, A.COALESCED})
# Statuses that wait for someone else: staff (staged), the sharded scan (deferred).
WAITING = frozenset({A.STAGED, A.DEFERRED})
LIVE = (A.INTENT, A.RETRYING, A.APPLYING)


def rows_changed(session: Session, statement: Executable) -> int:
    """Run an UPDATE and return its row count: who won a conditional change."""
    result = cast(CursorResult[Any], session.execute(
        statement, execution_options={"synchronize_session": False}))
    return int(result.rowcount)


@dataclass(frozen=True)
class Claim:
    """This execution holds the fix. `recovering`: the previous holder may have called
    the portal, so this one decides from a re-read and never calls."""

    action_id: int
    owner: str
    token: str
    until: datetime
    attempts: int
    recovering: bool
    called_at: datetime | None


@dataclass(frozen=True)
class NotClaimed:
    """Why not: the fix's status when it is finished or waiting, else "claimed"."""

    reason: str
    holder: str | None = None


def claim(
    sessions: sessionmaker[Session], action_id: int, owner: str, now: datetime,
    lease: timedelta,
) -> Claim | NotClaimed:
    with sessions() as session:
        row = session.get(ActionRow, action_id)
        if row is None:
            return NotClaimed("missing")
        status, seen_token, called_at = row.status, row.claim_token, row.called_at
        lapsed = row.lease_until is None or row.lease_until <= now
        holder = row.claimed_by
    if status in FINAL or status in WAITING:
        return NotClaimed(str(status))
    token = uuid.uuid4().hex
    values: dict[str, object] = {
        "status": A.APPLYING, "claimed_by": owner, "claim_token": token, "claimed_at": now,
        "lease_until": now + lease,
    }
    recovering = False
    if status in (A.INTENT, A.RETRYING):
        where = [
            ActionRow.status.in_([A.INTENT, A.RETRYING]),
            or_(
                ActionRow.lease_until.is_(None),
                ActionRow.lease_until <= now,
                # A Celery retry of the task that holds the claim keeps it.
                and_(ActionRow.status == A.RETRYING, ActionRow.claimed_by == owner),
            ),
        ]
        values.update(called_at=None, attempts=ActionRow.attempts + 1)
    elif status == A.APPLYING:
        if not lapsed:
            return NotClaimed("claimed", holder)
        # Taken over only from the holder seen above, and only while still lapsed.
        where = [ActionRow.status == A.APPLYING, ActionRow.claim_token == seen_token,
                 ActionRow.lease_until <= now]
        recovering = called_at is not None
        if not recovering:
            values["attempts"] = ActionRow.attempts + 1
    else:
        return NotClaimed(str(status))
    with sessions() as session, session.begin():
        won = rows_changed(
            session, update(ActionRow).where(ActionRow.id == action_id, *where).values(**values)
        )
        if won != 1:
            current = session.get(ActionRow, action_id)
            if current is not None and current.status in FINAL:
                return NotClaimed(str(current.status))
            return NotClaimed("claimed", current.claimed_by if current else None)
        attempts = session.scalar(select(ActionRow.attempts).where(ActionRow.id == action_id))
    return Claim(action_id, owner, token, now + lease, int(attempts or 0), recovering,
                 called_at if recovering else None)


def mark_called(
    sessions: sessionmaker[Session], claim: Claim, now: datetime, lease: timedelta,
    params: dict[str, Any] | None = None,
) -> bool:
    """Record that the portal call is about to go out (and renew the lease, since the
    rate limit may have made us wait), with the `params` it goes out with if they
    changed since planning. False: the claim was lost; do not call."""
    values: dict[str, Any] = {"called_at": now, "lease_until": now + lease}
    if params is not None:
        values["params"] = params
    with sessions() as session, session.begin():
        return rows_changed(session, (
            update(ActionRow)
            .where(ActionRow.id == claim.action_id, ActionRow.claim_token == claim.token,
                   ActionRow.status == A.APPLYING)
            .values(**values)
        )) == 1


def keep_for_retry(
    sessions: sessionmaker[Session], claim: Claim, now: datetime, retry_in: timedelta,
    lease: timedelta, error: str,
) -> bool:
    """A transient failure: `retrying`, still held by this task id until its Celery retry
    is due plus one lease, so the retry (same task id) claims it again and nobody else
    does meanwhile. The portal answered (with an error): the call is not in doubt."""
    with sessions() as session, session.begin():
        return rows_changed(session, (
            update(ActionRow)
            .where(ActionRow.id == claim.action_id, ActionRow.claim_token == claim.token,
                   ActionRow.status == A.APPLYING)
            .values(status=A.RETRYING, error=error, called_at=None,
                    lease_until=now + retry_in + lease)
        )) == 1


def mark_enqueued(sessions: sessionmaker[Session], ids: list[int], now: datetime) -> None:
    """The broker has a message for these fixes (sent after their intents committed)."""
    if not ids:
        return
    with sessions() as session, session.begin():
        session.execute(
            update(ActionRow).where(ActionRow.id.in_(ids)).values(enqueued_at=now)
            .execution_options(synchronize_session=False)
        )


def resumable(
    sessions: sessionmaker[Session], practice: str, now: datetime, *, grace: timedelta,
    requeue_after: timedelta,
) -> list[int]:
    """Fixes the resume tick must send again — and only those:

    - a claim that lapsed (its worker died, or its Celery retries ran out) and was not
      re-sent since it lapsed;
    - an intent never sent, `grace` after it was committed (the scan that committed it
      died before sending it);
    - an intent sent but still unclaimed after `requeue_after` (the broker lost it).

    A fix that is queued, being applied, or waiting for its own Celery retry is left
    alone: its claim or its message will finish it.
    """
    lapsed = and_(ActionRow.lease_until.is_not(None), ActionRow.lease_until <= now)
    resend = or_(
        and_(lapsed, or_(ActionRow.enqueued_at.is_(None),
                         ActionRow.enqueued_at < ActionRow.lease_until)),
        and_(ActionRow.lease_until.is_(None), ActionRow.enqueued_at.is_(None),
             ActionRow.created_at <= now - grace),
        and_(or_(ActionRow.lease_until.is_(None), lapsed),
             ActionRow.enqueued_at <= now - requeue_after),
    )
    with sessions() as session:
        return list(session.scalars(
            select(ActionRow.id).where(
                ActionRow.practice == practice, ActionRow.status.in_(LIVE), resend,
            ).order_by(ActionRow.id)
        ))


STATES = ("queued", "claimed", "retrying", "stalled", "held", "staged")


def fix_states(session: Session, practice: str, now: datetime) -> dict[str, dict[str, Any]]:
    """Fixes by where they are, each with its count and the age of the oldest, for
    `oprecon status`: queued (an intent nobody has claimed yet; age since it was
    planned), claimed (a worker holds it and may be calling the portal; since the
    claim), retrying (waiting for its retry; since the last attempt), stalled (a claim
    that lapsed, waiting for the resume tick to take it back; since the lapse), held
    (applied, the finding waits for the portal to catch up; since the fix) and staged
    (held back by the mass-change guard; since it was planned)."""
    out: dict[str, dict[str, Any]] = {s: {"count": 0, "oldest_age_seconds": None}
                                      for s in STATES}

    def add(state: str, since: datetime | None) -> None:
        entry = out[state]
        entry["count"] += 1
        if since is not None:
            age = round(max(0.0, (now - since).total_seconds()), 3)
            if entry["oldest_age_seconds"] is None or age > entry["oldest_age_seconds"]:
                entry["oldest_age_seconds"] = age

    rows = session.execute(
        select(ActionRow.status, ActionRow.created_at, ActionRow.claimed_at,
               ActionRow.lease_until)
        .where(ActionRow.practice == practice,
               ActionRow.status.in_([*LIVE, A.STAGED]))
    ).all()
    for status, created, claimed, lease in rows:
        lapsed = lease is not None and lease <= now
        if status == A.STAGED:
            add("staged", created)
        elif lapsed and status != A.INTENT:
            add("stalled", lease)
        elif status == A.APPLYING:
            add("claimed", claimed)
        elif status == A.RETRYING:
            add("retrying", claimed)
        else:
            add("queued", created)
    for (since,) in session.execute(
        select(FindingRow.state_changed_at).where(FindingRow.practice == practice,
                                                  FindingRow.state == FindingState.HELD)
    ):
        add("held", since)
    return out
