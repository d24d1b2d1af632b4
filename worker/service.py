"""What each Celery task does, as plain functions of settings: the tasks stay one-liners.

Every scan takes the practice's single-flight lock; a periodic scan that finds it
held is skipped and logged (never queued behind), an on-call run may wait for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import structlog

from config.settings import Settings
from worker.engine import (
    Deps,
    RunResult,
    ScopeRequest,
    due_holds,
    pending_intents,
    reconcile,
    time_rules,
    utcnow,
)
from worker.fixes import apply_action
from worker.locks import ScanBusy, single_flight
from worker.scope import Scope
from worker.wiring import build_deps

log = structlog.get_logger(__name__)


@dataclass
class ScanOutcome:
    status: str  # succeeded | skipped
    result: RunResult | None = None
    reason: str = ""
    action_ids: list[int] = field(default_factory=list)


def scan(
    settings: Settings,
    kind: str,
    request: ScopeRequest = ScopeRequest(),
    *,
    task_id: str | None = None,
    wait_seconds: float = 0,
    deps: Deps | None = None,
    now: datetime | None = None,
) -> ScanOutcome:
    try:
        with single_flight(settings, wait_seconds=wait_seconds):
            deps = deps or build_deps(settings)
            result = reconcile(deps, request, kind=kind, task_id=task_id, now=now)
    except ScanBusy as busy:
        log.info("scan_skipped", kind=kind, reason=str(busy))
        return ScanOutcome("skipped", reason=str(busy))
    return ScanOutcome("succeeded", result, action_ids=result.action_ids)


def verify_due(
    settings: Settings, *, deps: Deps | None = None, now: datetime | None = None,
    task_id: str | None = None,
) -> ScanOutcome:
    """Re-read the records of every finding whose hold has ended, in one scoped run."""
    now = now or utcnow()
    deps = deps or build_deps(settings)
    rows = due_holds(deps.sessions, settings.practice, now)
    if not rows:
        return ScanOutcome("succeeded", reason="no holds due")
    scope = Scope(
        "entities",
        f"{len(rows)} due hold(s)",
        frozenset(r.patient_id for r in rows if r.patient_id),
        frozenset(r.contact_id for r in rows if r.contact_id),
        frozenset(r.portal_user_id for r in rows if r.portal_user_id),
    )
    try:
        with single_flight(settings, wait_seconds=0):
            from worker.engine import read_snapshot

            snap = read_snapshot(deps.op, deps.portal)
            result = reconcile(
                deps, ScopeRequest("entities", scope.target), kind="verify", now=now,
                task_id=task_id, snapshot=snap, scope_override=scope,
            )
    except ScanBusy as busy:
        return ScanOutcome("skipped", reason=str(busy))
    return ScanOutcome("succeeded", result, action_ids=result.action_ids)


def apply_fix(settings: Settings, action_id: int, *, deps: Deps | None = None) -> str:
    deps = deps or build_deps(settings)
    from worker.safety import portal_guard

    return apply_action(
        deps.sessions, deps.portal, action_id, time_rules(settings), guard=portal_guard(settings)
    )


def unfinished_fixes(settings: Settings, *, deps: Deps | None = None) -> list[int]:
    deps = deps or build_deps(settings)
    return pending_intents(deps.sessions, settings.practice)
