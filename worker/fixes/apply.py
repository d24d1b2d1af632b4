"""Apply one journaled fix to the portal, exactly once, without trusting the portal's
idempotency.

The intent row was committed by the run. Here we (1) *claim* it (worker.fixes.claims):
one conditional UPDATE, so of two deliveries of the same fix only one goes on; (2) on a
later attempt, re-read the portal and record `already` if the change is there; (3) mark
the call as made and call the portal; (4) record the outcome under the claim and put the
finding on hold until the portal has caught up.

A worker killed after (3) leaves the fix `applying` with a lease that lapses; whoever
takes it over *recovers*: it re-reads the portal and records `already` when the change
shows, and otherwise — a source refresh leaves no trace, a Welcome email shows in the
audit log only after the portal's delay — it does not call again but records the fix as
`unconfirmed` and holds the finding from the time of the lost call: the hold's
verification decides (resolved, or a new attempt).

The same holds when the call itself ends in doubt: no answer (a timeout, a connection
lost after sending) or a 5xx answer, which a portal may give after it made the change.
Such a call is never sent again blindly: the fix re-reads, records `already` when the
change shows, and otherwise is `unconfirmed` and held; when the hold ends the
verification resolves the finding or reopens it, and the next attempt is a new fix
(bounded by `verify_max_retries`, then escalated). Only what surely did not reach the
portal (a refused connection, a 429, the breaker) is retried at once.

Welcome resends keep ids only in the journal: the address is read from OP at apply time.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from worker.checks.base import email_is_valid
from worker.fixes import claims
from worker.fixes.claims import Claim, NotClaimed
from worker.model.findings import FixKind
from worker.model.records import WELCOME_ACTION, Contact
from worker.model.text import address_key
from worker.scan.engine import utcnow
from worker.scan.lifecycle import TimeRules, transition
from worker.sources.base import PortalReader, PortalWriter
from worker.state.models import ActionRow, ActionStatus, FindingRow
from worker.state.models import FindingState as S

log = structlog.get_logger(__name__)

DONE = set(claims.FINAL)
DEFAULT_LEASE = timedelta(seconds=45)


class TransientPortalError(Exception):
    """Worth retrying later (timeouts, 429, 5xx, breaker open)."""


class CallGuard(Protocol):
    """Rate limit and circuit breaker around every portal write (worker.fixes.rails)."""

    def before_call(self) -> None: ...

    def record(self, ok: bool, reason: str | None = None) -> None: ...


class NoGuard:
    def before_call(self) -> None:
        return None

    def record(self, ok: bool, reason: str | None = None) -> None:
        return None


def _is_transient(err: Exception) -> bool:
    from worker.sources import portal_http

    transient = tuple(
        cls
        for cls in (
            getattr(portal_http, "PortalUnavailable", None),
            TransientPortalError,
            TimeoutError,
            ConnectionError,
        )
        if isinstance(cls, type)
    )
    return isinstance(err, transient)


def current_email(op: Any, contact_id: str | None) -> str | None:
    """The contact's address as OP has it now: None when the contact is gone, unreadable,
    inactive or without a valid address (then no Welcome email can be sent to them).
    A targeted read where the source has one (CSV index, SQL `WHERE id IN`)."""
    if op is None or not contact_id:
        return None
    select_contacts = getattr(op, "select_contacts", None)
    records = select_contacts(ids=[contact_id]) if callable(select_contacts) else op.contacts()
    for record in records:
        if isinstance(record, Contact) and record.contact_id == contact_id:
            email = record.email.strip()
            if record.active and email and email_is_valid(email):
                return email
            return None
    return None


def already_applied(
    portal: Any, kind: str, params: dict[str, Any], since: datetime, email: str | None = None
) -> bool:
    """Re-read the portal: does it already show the change this fix asks for?

    A source refresh leaves nothing to read back, and a Welcome email shows in the audit
    log only once the portal has caught up: False there means "cannot tell", not "no".
    """
    if kind == FixKind.SET_DUMMY_EMAIL:
        user = portal.get_user(params["user_id"])
        return user is not None and user.has_dummy_email
    if kind == FixKind.RESEND_WELCOME:
        if not email:
            return False
        wanted = email.lower()
        return any(
            getattr(ev, "action", None) == WELCOME_ACTION
            and (getattr(ev, "email", "") or "").lower() == wanted
            for ev in portal.audit(since=since)
        )
    return False


def apply_action(
    sessions: sessionmaker[Session],
    portal: PortalWriter | PortalReader | Any,
    action_id: int,
    rules: TimeRules,
    *,
    guard: CallGuard | None = None,
    now: Callable[[], datetime] = utcnow,
    max_attempts: int = 8,
    op: Any = None,
    owner: str | None = None,
    lease: timedelta = DEFAULT_LEASE,
    retry_in: timedelta = timedelta(0),
) -> str:
    """Apply one fix; returns its final status, or "claimed" when another execution holds
    it (this one then does nothing). Raises TransientPortalError to retry: the fix stays
    held by `owner` (the Celery task id) for `retry_in` plus one lease, so the task's own
    retry claims it again and nobody else does meanwhile.

    After `max_attempts` attempts (Celery's retries, then the resume tick's) the fix is
    given up as failed, so staff hear of it instead of the journal retrying for ever.
    `op` is the OP reader a Welcome resend reads the address from.
    """
    guard = guard or NoGuard()
    owner = owner or f"local:{uuid.uuid4().hex}"
    got = claims.claim(sessions, action_id, owner, now(), lease)
    if isinstance(got, NotClaimed):
        if got.reason == "missing":
            log.warning("fix_action_missing", action_id=action_id)
        elif got.reason == "claimed":
            log.info("fix_claimed_elsewhere", action_id=action_id, holder=got.holder)
        else:
            log.info("fix_already_done", action_id=action_id, status=got.reason)
        return got.reason
    view = _load(sessions, action_id)
    bound = log.bind(action_id=action_id, fix=view.kind, finding_id=view.finding_id)
    if view.finding_state == S.RESOLVED:
        return _finish(sessions, got, ActionStatus.ALREADY, rules, now(),
                       "finding resolved before the fix ran", move_finding=False)
    if got.recovering:
        return _recover(sessions, portal, got, view, rules, now(), op, bound)
    if got.attempts > max_attempts:
        bound.error("fix_gave_up", attempts=got.attempts - 1)
        return _finish(sessions, got, ActionStatus.FAILED, rules, now(),
                       f"gave up after {got.attempts - 1} attempts; last error: {view.error}")
    if not getattr(portal, "writable", False):
        return _finish(sessions, got, ActionStatus.UNAVAILABLE, rules, now(),
                       "portal source is read-only")
    email: str | None = None
    if view.kind == FixKind.RESEND_WELCOME:
        email = current_email(op, view.params.get("contact_id"))
        if email is None:
            bound.info("fix_welcome_no_address")
            return _finish(sessions, got, ActionStatus.UNAVAILABLE, rules, now(),
                           "OP has no valid email for this contact now: nothing sent")
    try:
        if got.attempts > 1 and already_applied(portal, view.kind, view.params,
                                                view.created_at, email):
            bound.info("fix_already_applied")
            return _finish(sessions, got, ActionStatus.ALREADY, rules, now(), None)
        # Marked before the rate limit and the call: from here on a crash means "may have
        # been called", and whoever takes over re-reads instead of calling.
        called = now()
        if not claims.mark_called(sessions, got, called, lease, _sent_params(view, email)):
            bound.warning("fix_claim_lost")
            return "claimed"
        guard.before_call()
        _call(portal, view, email)
        guard.record(True)
    except Exception as err:  # noqa: BLE001 — classified below, nothing swallowed silently
        reason = f"{type(err).__name__}: {str(err)[:300]}"
        if getattr(err, "in_doubt", False):
            # Sent, and no answer or a server error: it may have been applied. Decide as
            # after a crash, from a re-read, never by sending it again.
            guard.record(False, type(err).__name__)
            status = getattr(err, "status", None)
            bound.warning("fix_call_in_doubt", error=type(err).__name__, status=status)
            cause = (f"the portal answered HTTP {status} to the call"
                     if status is not None else "the portal call got no answer")
            return _recover(sessions, portal, replace(got, called_at=called), view, rules,
                            now(), op, bound, cause=cause)
        if _is_transient(err):
            guard.record(False, type(err).__name__)
            claims.keep_for_retry(sessions, got, now(), retry_in, lease, reason)
            bound.warning("fix_transient_error", error=type(err).__name__)
            raise TransientPortalError(reason) from err
        guard.record(False, type(err).__name__)
        bound.error("fix_failed", error=type(err).__name__)
        return _finish(sessions, got, ActionStatus.FAILED, rules, now(), reason)
    bound.info("fix_applied")
    return _finish(sessions, got, ActionStatus.APPLIED, rules, now(), None)


def _sent_params(view: _ActionView, email: str | None) -> dict[str, Any] | None:
    """A Welcome resend goes to the address OP has now: the journal keeps the key of the
    address actually sent, for the once-per-address rule (None: nothing changed)."""
    if view.kind != FixKind.RESEND_WELCOME or email is None:
        return None
    key = address_key(view.params.get("contact_id"), email)
    return None if view.params.get("address") == key else {**view.params, "address": key}


def _recover(
    sessions: sessionmaker[Session], portal: Any, got: Claim, view: _ActionView,
    rules: TimeRules, at: datetime, op: Any, bound: Any,
    cause: str = "a worker died during the portal call",
) -> str:
    """The previous holder died after its call may have gone out (or the call got no
    answer, or a server error): never call again.
    The portal shows the change → `already`; it cannot tell (or the read fails) →
    `unconfirmed`, held from the time of the lost call; the verification decides."""
    email = (current_email(op, view.params.get("contact_id"))
             if view.kind == FixKind.RESEND_WELCOME else None)
    try:
        done = already_applied(portal, view.kind, view.params, view.created_at, email)
    except Exception as err:  # noqa: BLE001 — a failed re-read cannot tell either
        bound.warning("fix_recovery_read_failed", error=type(err).__name__)
        done = False
    if done:
        bound.info("fix_recovered_already_applied")
        return _finish(sessions, got, ActionStatus.ALREADY, rules, at,
                       f"{cause}, and a re-read showed the change: not repeated")
    bound.warning("fix_recovered_unconfirmed")
    return _finish(sessions, got, ActionStatus.UNCONFIRMED, rules, at,
                   f"{cause}, and the portal cannot show yet whether it arrived: not "
                   "repeated; the hold's verification decides",
                   hold_from=got.called_at)


class _ActionView:
    """A detached copy of the fix, so no session is open during the portal call."""

    def __init__(self, row: ActionRow, finding_state: str | None) -> None:
        self.id = row.id
        self.kind = row.kind
        self.params = dict(row.params)
        self.idempotency_key = row.idempotency_key
        self.created_at = row.created_at
        self.attempts = row.attempts
        self.finding_id = row.finding_id
        self.error = row.error
        self.finding_state = finding_state


def _load(sessions: sessionmaker[Session], action_id: int) -> _ActionView:
    with sessions() as session:
        row = session.get(ActionRow, action_id)
        assert row is not None
        finding = session.get(FindingRow, row.finding_id)
        return _ActionView(row, finding.state if finding is not None else None)


def _call(portal: Any, action: _ActionView, email: str | None) -> None:
    p = action.params
    key = action.idempotency_key  # sent, but exactly-once does not depend on it
    if action.kind == FixKind.SET_DUMMY_EMAIL:
        portal.set_user_email(p["user_id"], p["email"], idempotency_key=key)
    elif action.kind == FixKind.REFRESH_SOURCE:
        portal.refresh_source(p["user_id"], idempotency_key=key)
    elif action.kind == FixKind.RESEND_WELCOME:
        assert email is not None
        portal.resend_welcome(p["contact_id"], email, idempotency_key=key)
    else:
        raise ValueError(f"unknown fix kind {action.kind}")


def _finish(
    sessions: sessionmaker[Session],
    got: Claim,
    status: ActionStatus,
    rules: TimeRules,
    at: datetime,
    error: str | None,
    *,
    hold_from: datetime | None = None,
    move_finding: bool = True,
) -> str:
    """Record the outcome — only while this execution still holds the claim — and move
    the finding (and every finding coalesced into this fix) on."""
    with sessions() as session, session.begin():
        values: dict[str, Any] = {"status": status, "error": error}
        if status in (ActionStatus.APPLIED, ActionStatus.ALREADY, ActionStatus.UNCONFIRMED):
            values["applied_at"] = at
        won = claims.rows_changed(session, (
            update(ActionRow)
            .where(ActionRow.id == got.action_id, ActionRow.claim_token == got.token,
                   ActionRow.status == ActionStatus.APPLYING)
            .values(**values)
        ))
        if won != 1:
            log.warning("fix_claim_lost", action_id=got.action_id, outcome=str(status))
            return "claimed"
        action = session.get(ActionRow, got.action_id)
        assert action is not None
        session.refresh(action)
        finding = session.get(FindingRow, action.finding_id)
        assert finding is not None
        followers = list(session.scalars(
            select(ActionRow).where(ActionRow.coalesced_into == action.id,
                                    ActionRow.status == ActionStatus.COALESCED,
                                    ActionRow.applied_at.is_(None))
            .order_by(ActionRow.id)
        ).all())
        if not move_finding:
            # This finding went away before the call: the findings it would have served
            # still need one. The first becomes the call (never sent: the resume tick
            # sends it), the others ride on it.
            if followers:
                heir = followers[0]
                heir.status, heir.coalesced_into = ActionStatus.INTENT, None
                for follower in followers[1:]:
                    follower.coalesced_into = heir.id
            return str(status)
        _move(session, action, finding, status, rules, at, error, hold_from)
        for follower in followers:
            served = session.get(FindingRow, follower.finding_id)
            follower.error = f"served by fix {action.id} ({status})"
            if served is None or served.state != S.FIX_QUEUED:
                continue
            if status in (ActionStatus.APPLIED, ActionStatus.ALREADY, ActionStatus.UNCONFIRMED):
                follower.applied_at = at
                served.fix_attempts += 1
                served.next_check_at = finding.next_check_at
                transition(session, served, S.HELD, at,
                           f"fix {action.kind} applied as fix {action.id} (one per portal "
                           f"user); verifying with it", follower.run_id)
            else:
                _move(session, follower, served, status, rules, at, error, None)
    return str(status)


def _move(
    session: Session, action: ActionRow, finding: FindingRow, status: ActionStatus,
    rules: TimeRules, at: datetime, error: str | None, hold_from: datetime | None,
) -> None:
    if status in (ActionStatus.APPLIED, ActionStatus.ALREADY, ActionStatus.UNCONFIRMED):
        finding.fix_attempts += 1
        hold = rules.hold_for(action.kind, finding.fix_attempts)
        finding.next_check_at = (hold_from or at) + hold
        what = ("outcome unknown (its worker died mid-call, or the portal gave no answer or "
                "a server error), not repeated"
                if status is ActionStatus.UNCONFIRMED else "applied")
        transition(
            session, finding, S.HELD, at,
            f"fix {action.kind} {what}; verifying after {hold.total_seconds() / 60:g} min",
            action.run_id,
        )
    elif status is ActionStatus.FAILED:
        transition(
            session, finding, S.ESCALATED, at,
            f"fix {action.kind} failed and will not be retried ({error}); contact OP support",
            action.run_id,
        )
    elif status is ActionStatus.UNAVAILABLE:
        transition(session, finding, S.OPEN, at,
                   f"fix cannot be applied: {error or 'the portal source is read-only'}",
                   action.run_id)
