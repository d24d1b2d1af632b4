"""What each Celery task does, as plain functions of settings: the tasks stay one-liners.

Every scan takes the practice's single-flight lock; a periodic scan that finds it
held is skipped and logged (never queued behind), an on-call run may wait for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

from config.settings import Settings
from worker.fixes import claims
from worker.fixes.apply import TransientPortalError, apply_action
from worker.model.scope import Scope
from worker.runtime import lost, metrics
from worker.scan import progress, shards
from worker.scan.engine import (
    Deps,
    RunResult,
    ScopeRequest,
    due_holds,
    reconcile,
    time_rules,
    utcnow,
)
from worker.scan.incremental import full_reconcile, incremental_reconcile
from worker.scan.locks import ScanBusy, single_flight
from worker.scan.wiring import build_deps, state_sessions
from worker.state.models import ActionRow

log = structlog.get_logger(__name__)


@dataclass
class ScanOutcome:
    status: str  # succeeded | skipped | started (a sharded full scan was enqueued)
    result: RunResult | None = None
    reason: str = ""
    action_ids: list[int] = field(default_factory=list)


def scan(
    settings: Settings,
    kind: str,
    request: ScopeRequest | None = None,
    *,
    task_id: str | None = None,
    wait_seconds: float = 0,
    deps: Deps | None = None,
    now: datetime | None = None,
    fan_out: Callable[[int, int], None] | None = None,
) -> ScanOutcome:
    """`fan_out(parent_run_id, count)` enqueues the shards of a sharded full scan
    (default: worker.runtime.dispatch.enqueue_shards)."""
    request = request or ScopeRequest()
    if kind == "full" and request.kind == "all" and settings.full_scan_shards > 1:
        return _start_sharded(settings, task_id=task_id, deps=deps, now=now, fan_out=fan_out)
    # An ad hoc run reports its progress under its task id (worker.scan.progress).
    tracked = task_id if kind == "adhoc" else None
    started = time.perf_counter()
    try:
        with progress.scan_lock(settings, wait_seconds=wait_seconds, task_id=tracked), \
                lost.lease(settings, task_id, holds_scan_lock=True):
            deps = deps or build_deps(settings)
            metrics.watch_portal(deps.portal)
            if kind == "incremental" and shards.running_parent(deps, now) is not None:
                # Its shards hold no practice lock: keep off the rows they are deciding.
                raise ScanBusy("a sharded full scan is running")
            if kind == "incremental" and request.kind == "all":
                result = incremental_reconcile(deps, now, task_id=task_id)
            elif kind == "full" and request.kind == "all":
                result = full_reconcile(deps, now, task_id=task_id)  # also sets the watermark
            else:
                result = reconcile(deps, request, kind=kind, task_id=task_id, now=now)
    except ScanBusy as busy:
        log.info("scan_skipped", kind=kind, reason=str(busy))
        metrics.scan_finished(kind, "skipped", time.perf_counter() - started)
        return ScanOutcome("skipped", reason=str(busy))
    except Exception as err:
        metrics.scan_finished(kind, "failed", time.perf_counter() - started)
        _record_failure(settings, deps, kind, request.label, task_id, err, now)
        raise
    metrics.scan_finished(kind, "succeeded", time.perf_counter() - started)
    _record_metrics(result, now)
    progress.record_done(settings, tracked, result)
    return ScanOutcome("succeeded", result, action_ids=result.action_ids)


def _record_failure(
    settings: Settings, deps: Deps | None, kind: str, scope: str, task_id: str | None,
    err: BaseException, now: datetime | None,
) -> None:
    """A failed scan leaves a run row with its cause, even when it failed before the
    engine opened one (worker.scan.failures)."""
    from worker.scan.failures import record_failed_scan

    try:
        sessions = deps.sessions if deps is not None else state_sessions(settings)
    except Exception:  # noqa: BLE001 — the state database may be what failed
        sessions = None
    record_failed_scan(sessions, settings.practice, kind, scope, task_id, err, now)


def _start_sharded(
    settings: Settings, *, task_id: str | None, deps: Deps | None, now: datetime | None,
    fan_out: Callable[[int, int], None] | None,
) -> ScanOutcome:
    """Create the parent run and enqueue the shards, holding the practice lock only
    meanwhile (worker.scan.shards); refused while another sharded scan still runs."""
    count = settings.full_scan_shards
    try:
        with progress.scan_lock(settings):
            deps = deps or build_deps(settings)
            parent_id = shards.start(deps, count, now=now, task_id=task_id)
            if fan_out is None:
                from worker.runtime.dispatch import enqueue_shards

                fan_out = enqueue_shards
            try:
                fan_out(parent_id, count)
            except Exception as err:
                shards.fail_parent(deps, parent_id, f"enqueue failed: {type(err).__name__}")
                raise
    except (ScanBusy, shards.ShardedScanRunning) as busy:
        log.info("scan_skipped", kind="full", reason=str(busy))
        return ScanOutcome("skipped", reason=str(busy))
    log.info("sharded_scan_started", parent_run_id=parent_id, shards=count)
    return ScanOutcome("started", reason=f"run {parent_id}: {count} shards enqueued")


def scan_shard(
    settings: Settings, parent_id: int, index: int, count: int, *,
    task_id: str | None = None, deps: Deps | None = None, now: datetime | None = None,
) -> ScanOutcome:
    """One shard of a sharded full scan, under its own shard lock (not the practice's)."""
    started = time.perf_counter()
    try:
        with shards.shard_lock(settings, index), \
                lost.lease(settings, task_id, holds_scan_lock=False):
            deps = deps or build_deps(settings)
            metrics.watch_portal(deps.portal)
            result = shards.run_shard(deps, parent_id, index, count, now=now,
                                      task_id=task_id)
    except ScanBusy as busy:
        log.info("scan_skipped", kind="shard", reason=str(busy))
        metrics.scan_finished("shard", "skipped", time.perf_counter() - started)
        return ScanOutcome("skipped", reason=str(busy))
    except Exception:
        metrics.scan_finished("shard", "failed", time.perf_counter() - started)
        raise
    metrics.scan_finished("shard", "succeeded", time.perf_counter() - started)
    return ScanOutcome("succeeded", result, action_ids=result.action_ids)


def _record_metrics(result: RunResult, now: datetime | None) -> None:
    """Findings gauges only from full-scope runs (an incremental or one-patient run sees a
    part); the last-success time from every run the dead-man's switch counts."""
    if result.dry_run:
        return
    counts = result.kind in ("full", "incremental") or result.scope.is_all
    metrics.run_recorded(
        [(i.finding.check, str(i.finding.severity)) for i in result.plan.items],
        full_scope=result.scope.is_all,
        success_at=(now or utcnow()) if counts else None,
    )


def verify_due(
    settings: Settings, *, deps: Deps | None = None, now: datetime | None = None,
    task_id: str | None = None,
) -> ScanOutcome:
    """Re-read the records of every finding whose hold has ended, in one scoped run."""
    now = now or utcnow()
    deps = deps or build_deps(settings)
    lost.reap(settings, deps.sessions)  # every minute: runs whose worker died (runtime.lost)
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
    started = time.perf_counter()
    try:
        with single_flight(settings, wait_seconds=0), \
                lost.lease(settings, task_id, holds_scan_lock=True):
            from worker.scan.engine import read_snapshot

            metrics.watch_portal(deps.portal)
            snap = read_snapshot(deps.op, deps.portal)
            result = reconcile(
                deps, ScopeRequest("entities", scope.target), kind="verify", now=now,
                task_id=task_id, snapshot=snap, scope_override=scope,
            )
    except ScanBusy as busy:
        metrics.scan_finished("verify", "skipped", time.perf_counter() - started)
        return ScanOutcome("skipped", reason=str(busy))
    except Exception:
        metrics.scan_finished("verify", "failed", time.perf_counter() - started)
        raise
    metrics.scan_finished("verify", "succeeded", time.perf_counter() - started)
    return ScanOutcome("succeeded", result, action_ids=result.action_ids)


def apply_fix(
    settings: Settings, action_id: int, *, deps: Deps | None = None, owner: str | None = None,
    retry_in: float = 0.0,
) -> str:
    """One fix under a claim owned by `owner` (the Celery task id); `retry_in` is the
    countdown of the retry the task will schedule if this attempt fails transiently,
    during which the claim stays this task's."""
    deps = deps or build_deps(settings)
    from worker.fixes.rails import portal_guard

    metrics.watch_portal(deps.portal)
    try:
        outcome = apply_action(
            deps.sessions, deps.portal, action_id, time_rules(settings),
            guard=portal_guard(settings), max_attempts=settings.fix_max_attempts,
            op=deps.op, owner=owner, lease=settings.fix_lease,
            retry_in=timedelta(seconds=retry_in),
        )
    except TransientPortalError:
        metrics.fix_finished(_fix_kind(deps, action_id), "retrying")
        raise
    metrics.fix_finished(_fix_kind(deps, action_id), outcome)
    return outcome


def _fix_kind(deps: Deps, action_id: int) -> str:
    with deps.sessions() as session:
        row = session.get(ActionRow, action_id)
        return row.kind if row is not None else "unknown"


def unfinished_fixes(
    settings: Settings, *, deps: Deps | None = None, now: datetime | None = None
) -> list[int]:
    """What the resume tick sends again (worker.fixes.claims.resumable): lapsed claims
    and fixes never sent; not those queued, running or waiting for their own retry."""
    deps = deps or build_deps(settings)
    return claims.resumable(
        deps.sessions, settings.practice, now or utcnow(), grace=settings.fix_lease,
        requeue_after=timedelta(seconds=settings.broker_visibility_timeout_seconds),
    )


def fixes_enqueued(
    settings: Settings, ids: list[int], *, deps: Deps | None = None,
    now: datetime | None = None,
) -> None:
    """Stamp `enqueued_at` once the messages are with the broker."""
    if ids:
        from worker.scan.wiring import state_sessions

        sessions = deps.sessions if deps is not None else state_sessions(settings)
        claims.mark_enqueued(sessions, ids, now or utcnow())
