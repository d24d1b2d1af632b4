"""Apply one journaled fix to the portal, exactly once.

The intent row was committed by the run. Here we (1) claim it, (2) re-read the portal
and record `already` if the change is there, (3) call the portal with the intent's
idempotency key, (4) record the outcome and put the finding on hold until the portal
has caught up. A worker killed anywhere in between leaves an intent or a `retrying`
row that the next attempt finishes the same way; the portal's idempotency key makes a
repeated call harmless.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import structlog
from sqlalchemy.orm import Session, sessionmaker

from worker.model.findings import FixKind
from worker.model.records import WELCOME_ACTION
from worker.scan.engine import utcnow
from worker.scan.lifecycle import TimeRules, transition
from worker.sources.base import PortalReader, PortalWriter
from worker.state.models import ActionRow, ActionStatus, FindingRow
from worker.state.models import FindingState as S

log = structlog.get_logger(__name__)

DONE = {
    ActionStatus.APPLIED,
    ActionStatus.ALREADY,
    ActionStatus.FAILED,
    ActionStatus.REJECTED,
    ActionStatus.UNAVAILABLE,
}


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


def already_applied(portal: Any, action: ActionRow) -> bool:
    """Re-read the portal: is the change this intent asks for already there?"""
    p = action.params
    if action.kind == FixKind.SET_DUMMY_EMAIL:
        user = portal.get_user(p["user_id"])
        return user is not None and user.has_dummy_email
    if action.kind == FixKind.RESEND_WELCOME:
        email = (p.get("email") or "").lower()
        if not email:
            return False
        return any(
            getattr(ev, "action", None) == WELCOME_ACTION and ev.email.lower() == email
            for ev in portal.audit(since=action.created_at)
        )
    return False  # a source refresh leaves no trace to read back; the key dedupes it


def apply_action(
    sessions: sessionmaker[Session],
    portal: PortalWriter | PortalReader | Any,
    action_id: int,
    rules: TimeRules,
    *,
    guard: CallGuard | None = None,
    now: Callable[[], datetime] = utcnow,
    max_attempts: int = 8,
) -> str:
    """Apply one intent; returns its final status. Raises TransientPortalError to retry.

    After `max_attempts` transient failures (Celery's retries, then the resume task's
    re-enqueues) the fix is given up as failed, so staff hear of it instead of the
    journal retrying for ever.
    """
    guard = guard or NoGuard()
    with sessions() as session, session.begin():
        action = session.get(ActionRow, action_id, with_for_update=True)
        if action is None:
            log.warning("fix_action_missing", action_id=action_id)
            return "missing"
        if action.status in DONE or action.status == ActionStatus.STAGED:
            return str(action.status)
        finding = session.get(FindingRow, action.finding_id)
        assert finding is not None
        if finding.state == S.RESOLVED:
            action.status = ActionStatus.ALREADY
            action.error = "finding resolved before the fix ran"
            action.applied_at = now()
            return str(action.status)
        exhausted = action.attempts >= max_attempts
        if not exhausted:
            action.attempts += 1
            action.status = (
                ActionStatus.RETRYING if action.attempts > 1 else ActionStatus.INTENT
            )
        snapshot = _ActionView(action)
        last_error = action.error

    if exhausted:
        log.error("fix_gave_up", action_id=action_id, attempts=snapshot.attempts)
        return _finish(sessions, action_id, ActionStatus.FAILED, rules, now(),
                       f"gave up after {snapshot.attempts} attempts; last error: {last_error}")

    bound = log.bind(action_id=action_id, fix=snapshot.kind, finding_id=snapshot.finding_id)
    if not getattr(portal, "writable", False):
        return _finish(sessions, action_id, ActionStatus.UNAVAILABLE, rules, now(),
                       "portal source is read-only")
    try:
        if snapshot.attempts > 1 and already_applied(portal, snapshot):  # type: ignore[arg-type]
            bound.info("fix_already_applied")
            return _finish(sessions, action_id, ActionStatus.ALREADY, rules, now(), None)
        guard.before_call()
        _call(portal, snapshot)
        guard.record(True)
    except Exception as err:  # noqa: BLE001 — classified below, nothing swallowed silently
        reason = f"{type(err).__name__}: {str(err)[:300]}"
        if _is_transient(err):
            guard.record(False, type(err).__name__)
            with sessions() as session, session.begin():
                row = session.get(ActionRow, action_id)
                if row is not None:
                    row.status = ActionStatus.RETRYING
                    row.error = reason
            bound.warning("fix_transient_error", error=type(err).__name__)
            raise TransientPortalError(reason) from err
        guard.record(False, type(err).__name__)
        bound.error("fix_failed", error=type(err).__name__)
        return _finish(sessions, action_id, ActionStatus.FAILED, rules, now(), reason)
    bound.info("fix_applied")
    return _finish(sessions, action_id, ActionStatus.APPLIED, rules, now(), None)


class _ActionView:
    """A detached copy of the intent, so no session is open during the portal call."""

    def __init__(self, row: ActionRow) -> None:
        self.id = row.id
        self.kind = row.kind
        self.params = dict(row.params)
        self.idempotency_key = row.idempotency_key
        self.created_at = row.created_at
        self.attempts = row.attempts
        self.finding_id = row.finding_id


def _call(portal: Any, action: _ActionView) -> None:
    p = action.params
    key = action.idempotency_key
    if action.kind == FixKind.SET_DUMMY_EMAIL:
        portal.set_user_email(p["user_id"], p["email"], idempotency_key=key)
    elif action.kind == FixKind.REFRESH_SOURCE:
        portal.refresh_source(p["user_id"], idempotency_key=key)
    elif action.kind == FixKind.RESEND_WELCOME:
        portal.resend_welcome(p["contact_id"], p["email"], idempotency_key=key)
    else:
        raise ValueError(f"unknown fix kind {action.kind}")


def _finish(
    sessions: sessionmaker[Session],
    action_id: int,
    status: ActionStatus,
    rules: TimeRules,
    at: datetime,
    error: str | None,
) -> str:
    with sessions() as session, session.begin():
        action = session.get(ActionRow, action_id)
        assert action is not None
        finding = session.get(FindingRow, action.finding_id)
        assert finding is not None
        action.status = status
        action.error = error
        if status in (ActionStatus.APPLIED, ActionStatus.ALREADY):
            action.applied_at = at
            finding.fix_attempts += 1
            hold = rules.hold_for(action.kind, finding.fix_attempts)
            finding.next_check_at = at + hold
            transition(
                session, finding, S.HELD, at,
                f"fix {action.kind} applied; verifying after {hold.total_seconds() / 60:g} min",
                action.run_id,
            )
        elif status is ActionStatus.FAILED:
            transition(
                session, finding, S.ESCALATED, at,
                f"fix {action.kind} failed and will not be retried ({error}); contact OP support",
                action.run_id,
            )
        elif status is ActionStatus.UNAVAILABLE:
            transition(
                session, finding, S.OPEN, at,
                "fix cannot be applied: the portal source is read-only", action.run_id,
            )
    return str(status)
