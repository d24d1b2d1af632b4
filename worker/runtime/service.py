"""What each Celery task does, as plain functions of settings: the tasks stay one-liners.

Practice scans (full, incremental, an on-call `--all`) take the practice's single-flight
lock; a periodic one that finds it held is skipped — with a `skipped` run row naming the
reason and the holder, and a metric — never queued behind; a skipped nightly full scan is
deferred (worker.runtime.deferral). An on-call `--all` run may wait for the lock, in
turn (fair waiting, worker.scan.locks).

Family-scoped runs (on-call `--patient`/`--contact`, the verify tick) take no practice
lock: they read their neighbourhood only and write under the short state write lock
(worker.scan.incremental.family_reconcile), so they never wait behind a practice scan's
read and never collide with the incremental scan.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from config.settings import Settings
from worker.fixes import claims
from worker.fixes.apply import TransientPortalError, apply_action
from worker.model.scope import Scope
from worker.runtime import deferral, lost, metrics
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
from worker.scan.incremental import (
    FULL_SCAN_ONLY,
    Ids,
    family_reconcile,
    family_seeds,
    full_reconcile,
    incremental_reconcile,
)
from worker.scan.locks import ScanBusy, StaleRead, family_write, practice_write
from worker.scan.wiring import build_deps, state_sessions
from worker.state.models import ActionRow, Run

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
    # An ad hoc run reports its progress under its task id (worker.scan.progress).
    tracked = task_id if kind == "adhoc" else None
    if kind == "adhoc" and request.kind in FAMILY_KINDS:
        return _family_scan(settings, request, task_id=task_id, deps=deps, now=now)
    if kind == "full" and request.kind == "all" and settings.full_scan_shards > 1:
        return _start_sharded(settings, task_id=task_id, deps=deps, now=now, fan_out=fan_out)
    started = time.perf_counter()
    ran = kind
    try:
        with progress.scan_lock(settings, wait_seconds=wait_seconds, task_id=tracked), \
                lost.lease(settings, task_id, holds_scan_lock=True):
            deps = deps or build_deps(settings)
            _watch(settings, deps)
            if kind == "incremental" and shards.running_parent(deps, now) is not None:
                # Its shards hold no practice lock: keep off the rows they are deciding.
                raise ScanBusy("a sharded full scan is running")
            read_at = time.time()

            def section() -> Any:
                return practice_write(settings, read_at, wait_seconds=WRITE_WAIT_SECONDS)

            if kind == "incremental" and request.kind == "all" and _full_scan_owed(
                    settings, deps, now):
                ran = "full"  # the deferred nightly full scan, in this scan's place
                log.info("deferred_full_scan_running", task_id=task_id)
            if ran == "incremental" and request.kind == "all":
                result = incremental_reconcile(deps, now, task_id=task_id, write_section=section)
            elif ran == "full" and request.kind == "all":
                # Also sets the watermark.
                result = full_reconcile(deps, now, task_id=task_id, write_section=section)
            else:
                result = reconcile(deps, request, kind=kind, task_id=task_id, now=now,
                                   write_section=section)
    except ScanBusy as busy:
        return _skipped(settings, kind, request, busy, task_id=task_id, deps=deps, now=now,
                        seconds=time.perf_counter() - started)
    except Exception as err:
        metrics.scan_finished(kind, "failed", time.perf_counter() - started)
        _record_failure(settings, deps, kind, request.label, task_id, err, now)
        raise
    metrics.scan_finished(kind, "succeeded", time.perf_counter() - started)
    if ran == "full" and not result.dry_run:
        deferral.clear(deps.sessions, settings)
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


FAMILY_KINDS = ("patient", "contact")
# How long a scan waits for the state write lock: family runs hold it for milliseconds,
# a practice scan for its write phase (seconds at 100,000 patients).
WRITE_WAIT_SECONDS = 120.0


_DEPS: dict[int, tuple[Settings, Deps]] = {}


def _process_deps(settings: Settings) -> Deps:
    """The sources of a family-scoped run, built once per worker process: a burst of
    on-call runs each took a new OP database engine (a new connection) and a new portal
    HTTP client, which cost more than the run itself. Keyed by the settings object (the
    worker's is cached for its life)."""
    held = _DEPS.get(id(settings))
    if held is None or held[0] is not settings:
        held = (settings, build_deps(settings))
        _DEPS[id(settings)] = held
    return held[1]


def warm_up(settings: Settings) -> None:
    """Best effort (a pool child's start): the sources, the state database's schema
    check and the modules a family run imports late. A failure only means the first run
    does it itself."""
    try:
        import worker.fixes.rails  # noqa: F401
        import worker.matching.duplicates  # noqa: F401

        _watch(settings, _process_deps(settings))
    except Exception as err:
        log.warning("warm_up_failed", error=type(err).__name__)


def _watch(settings: Settings, deps: Deps) -> None:
    """Portal call metrics, and the shared read rate limit."""
    from worker.fixes.rails import throttle_reads

    metrics.watch_portal(deps.portal)
    throttle_reads(settings, deps.portal)


def _full_scan_owed(settings: Settings, deps: Deps, now: datetime | None) -> bool:
    """A deferred nightly full scan is owed (and past its deadline, alerted on)."""
    return deferral.check_deadline(deps.sessions, settings, now or utcnow()) is not None


def _family_guard(settings: Settings) -> Any:
    def guard(read_at: float, scope: Scope) -> Any:
        return family_write(settings, read_at, scope.patient_ids, scope.contact_ids,
                            scope.user_ids, wait_seconds=WRITE_WAIT_SECONDS)

    return guard


def _family_scan(
    settings: Settings, request: ScopeRequest, *, task_id: str | None, deps: Deps | None,
    now: datetime | None,
) -> ScanOutcome:
    """An on-call run about one patient or contact: their family's neighbourhood only,
    no practice lock (module docstring)."""
    started = time.perf_counter()
    try:
        deps = deps or _process_deps(settings)
        _watch(settings, deps)
        progress.record(settings, task_id, "started")
        with lost.lease(settings, task_id, holds_scan_lock=False):
            result = family_reconcile(deps, family_seeds(request), request, kind="adhoc",
                                      guard=_family_guard(settings), now=now,
                                      task_id=task_id)
    except (ScanBusy, StaleRead) as busy:
        progress.record(settings, task_id, "skipped")
        if not isinstance(busy, ScanBusy):
            busy = ScanBusy(str(busy))
        return _skipped(settings, "adhoc", request, busy, task_id=task_id, deps=deps, now=now,
                        seconds=time.perf_counter() - started)
    except Exception as err:
        progress.record(settings, task_id, "failed", error=type(err).__name__)
        metrics.scan_finished("adhoc", "failed", time.perf_counter() - started)
        _record_failure(settings, deps, "adhoc", request.label, task_id, err, now)
        raise
    metrics.scan_finished("adhoc", "succeeded", time.perf_counter() - started)
    _record_metrics(result, now)
    progress.record_done(settings, task_id, result)
    return ScanOutcome("succeeded", result, action_ids=result.action_ids)


def record_expired(settings: Settings, kind: str, task_id: str | None) -> None:
    """A scheduled scan that expired in the queue (its `expires` passed before a worker
    slot was free, so Celery dropped it without running it): a `skipped` run row like any
    other skip, and a nightly full scan deferred. Called in the worker's main process,
    hence a throw-away engine: pooled connections must not leak into pool children
    forked later."""
    from worker.state.db import make_engine, session_factory

    engine = make_engine(settings.state_db_url)
    try:
        _skipped(settings, kind, ScopeRequest(), ScanBusy(
            "expired in the queue before a worker slot was free"), task_id=task_id,
            deps=None, now=None, seconds=0.0, sessions=session_factory(engine))
    except Exception as err:
        log.warning("expired_scan_not_recorded", kind=kind, error=type(err).__name__)
    finally:
        engine.dispose()


def _skipped(
    settings: Settings, kind: str, request: ScopeRequest, busy: ScanBusy, *,
    task_id: str | None, deps: Deps | None, now: datetime | None, seconds: float,
    sessions: Any = None,
) -> ScanOutcome:
    """A scan that did not run: a `skipped` run row (reason and holder), the metric, the
    log line; a nightly full scan is deferred, not dropped (worker.runtime.deferral)."""
    reason = str(busy)
    holder = getattr(busy, "holder", None)
    metrics.scan_finished(kind, "skipped", seconds)
    at = now or utcnow()
    if sessions is None:
        sessions = deps.sessions if deps is not None else state_sessions(
            settings, migrate_first=False)
    try:
        with sessions.begin() as session:
            session.add(Run(
                practice=settings.practice, kind=kind, scope=request.label, status="skipped",
                started_at=at, finished_at=at, task_id=task_id,
                error=reason + (f" (held by {holder})" if holder else ""),
                summary={"skipped": {"reason": reason, "holder": holder}},
            ))
            if kind == "full" and request.kind == "all":  # one commit with the row
                deferral.defer_in(session, settings, at, reason, holder)
    except Exception as err:  # the state DB may be what is down: the log line stays
        log.warning("skipped_run_not_recorded", kind=kind, error=type(err).__name__)
        if kind == "full":
            raise
    finally:
        # After the row: whoever reads this line finds the row.
        log.info("scan_skipped", kind=kind, reason=reason, holder=holder)
    return ScanOutcome("skipped", reason=reason)


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
        if not isinstance(busy, ScanBusy):
            busy = ScanBusy(str(busy))
        return _skipped(settings, "full", ScopeRequest(), busy, task_id=task_id, deps=deps,
                        now=now, seconds=0.0)
    log.info("sharded_scan_started", parent_run_id=parent_id, shards=count)
    deferral.clear(deps.sessions, settings)
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
            read_at = time.time()

            def section() -> Any:
                return practice_write(settings, read_at, wait_seconds=WRITE_WAIT_SECONDS)

            result = shards.run_shard(deps, parent_id, index, count, now=now,
                                      task_id=task_id, write_section=section)
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
    """Re-read the records of every finding whose hold has ended, in one family-scoped
    run: their neighbourhood only, without the practice lock, so the tick never collides
    with the incremental scan beat sends beside it (module docstring)."""
    now = now or utcnow()
    deps = deps or _process_deps(settings)
    lost.reap(settings, deps.sessions)  # every minute: runs whose worker died (runtime.lost)
    rows = due_holds(deps.sessions, settings.practice, now)
    if not rows:
        return ScanOutcome("succeeded", reason="no holds due")
    seeds = Ids(
        {r.patient_id for r in rows if r.patient_id},
        {r.contact_id for r in rows if r.contact_id},
        {r.portal_user_id for r in rows if r.portal_user_id},
    )
    scope = Scope(
        "entities", f"{len(rows)} due hold(s)", frozenset(seeds.patients),
        frozenset(seeds.contacts), frozenset(seeds.users), exclude_checks=FULL_SCAN_ONLY,
    )
    started = time.perf_counter()
    request = ScopeRequest("entities", scope.target)
    try:
        _watch(settings, deps)
        with lost.lease(settings, task_id, holds_scan_lock=False):
            result = family_reconcile(deps, seeds, request, kind="verify", scope=scope,
                                      now=now, task_id=task_id, guard=_family_guard(settings))
    except (ScanBusy, StaleRead) as busy:
        if not isinstance(busy, ScanBusy):
            busy = ScanBusy(str(busy))
        return _skipped(settings, "verify", request, busy, task_id=task_id, deps=deps,
                        now=now, seconds=time.perf_counter() - started)
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
