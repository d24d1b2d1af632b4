"""One reconciliation run: sources → snapshot → checks → findings → plan → journal.

`reconcile` is plain Python: the Celery tasks, the CLI and the tests all call it. It
commits the run, the findings and every fix *intent* before returning; applying the
fixes is a separate step (`worker.fixes.apply.apply_action`) so a crash between the two
leaves intents that the next run finishes.
"""

from __future__ import annotations

import gc
import hashlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Policy, Settings
from worker.checks import CheckContext, run_checks
from worker.checks.rootcause import BLOCKERS
from worker.matching.index import Learned
from worker.model.findings import FixKind
from worker.model.scope import ALL, Scope, for_contact, for_patient
from worker.model.snapshot import FileShares, Snapshot
from worker.model.text import address_key
from worker.scan import failures
from worker.scan.explain import describe
from worker.scan.lifecycle import SyncResult, TimeRules, sync, transition
from worker.scan.locks import Ceded
from worker.scan.planner import Decision, FixGate, Plan, default_policy, make_plan
from worker.sources.base import OPReader, PortalReader
from worker.sources.tables import ID_SEP
from worker.state.db import kv_get, kv_set
from worker.state.models import ActionRow, ActionStatus, FindingRow, Run
from worker.state.models import FindingState as S

log = structlog.get_logger(__name__)


@dataclass
class Deps:
    """What a run needs; built once per process from settings (worker.scan.wiring)."""

    settings: Settings
    sessions: sessionmaker[Session]
    op: OPReader
    portal: PortalReader
    portal_writable: bool = False


@dataclass(frozen=True)
class ScopeRequest:
    kind: str = "all"  # all | patient | contact
    target: str | None = None

    @property
    def label(self) -> str:
        return "all" if self.kind == "all" else f"{self.kind}:{self.target}"


@dataclass
class RunResult:
    run_id: int | None
    kind: str
    scope: Scope
    plan: Plan
    counts: dict[str, int]
    sync: SyncResult
    dry_run: bool
    read_seconds: float
    check_seconds: float
    total_seconds: float
    suppressed_recent: int
    action_ids: list[int] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    # With `keep_op_ids`: the ids of the OP rows read (worker.scan.deletions).
    op_ids: dict[str, set[str]] | None = None
    # Rows a family-scoped run read from the sources (None: a practice read).
    rows_read: int | None = None
    # With `keep_duplicate_index`: what the duplicate matcher learned over every contact
    # (worker.matching.index.Learned), for incremental scans to come.
    learned_duplicates: Learned | None = None

    def summary(self) -> dict[str, Any]:
        extra = {} if self.rows_read is None else {"rows_read": self.rows_read}
        return {**extra,
            "run_id": self.run_id,
            "kind": self.kind,
            "scope": self.scope.label,
            "dry_run": self.dry_run,
            "records": sum(v for k, v in self.counts.items() if k != "invalid"),
            "findings": len(self.plan.items),
            "new": self.sync.new,
            "reopened": self.sync.reopened,
            "resolved": self.sync.resolved,
            "escalated": self.sync.escalated,
            "by_check": dict(sorted(self.plan.by_check().items())),
            "by_decision": dict(sorted(self.plan.counts().items())),
            "guard": self.plan.guard_reason or None,
            "suppressed_recent": self.suppressed_recent,
            "read_seconds": round(self.read_seconds, 3),
            "check_seconds": round(self.check_seconds, 3),
            "seconds": round(self.total_seconds, 3),
        }


def utcnow() -> datetime:
    return datetime.now(UTC)


# kv key: the tables the last whole read could not conclude absences from ("tables"),
# and the files it found over the unreadable limit ("over": table → bad, total, run, at).
BLIND_KEY = "blind_tables"


def unreadable_verdict(
    over: dict[str, tuple[int, int]], run_id: int | None, now: datetime
) -> dict[str, dict[str, Any]]:
    """What BLIND_KEY keeps of a run's over-limit files, for the runs after it."""
    return {table: {"bad": bad, "total": total, "run_id": run_id, "at": now.isoformat()}
            for table, (bad, total) in sorted(over.items())}


def carried_reason(over: dict[str, Any]) -> str | None:
    """Why a run that cannot measure the files itself plans no fixes: the last run that
    did found too much of one unreadable (kept until a full read finds it readable)."""
    if not over:
        return None
    files = ", ".join(f"{t} ({v.get('bad')} of {v.get('total')} rows, run {v.get('run_id')})"
                      for t, v in sorted(over.items()))
    return (f"too much of the input could not be read when last measured ({files}): no "
            "fixes until a full read finds it readable")


def time_rules(settings: Settings) -> TimeRules:
    return TimeRules(
        propagation_delay=settings.propagation_delay,
        hold=settings.hold,
        source_refresh_hold=settings.source_refresh_hold,
        verify_max_retries=settings.verify_max_retries,
    )


def read_snapshot(op: OPReader, portal: PortalReader) -> Snapshot:
    return Snapshot.build(
        op.patients(),
        op.contacts(),
        op.family_contacts(),
        portal.users(),
        portal.links(),
        portal.sources(),
        portal.audit(),
    )


def op_row_ids(snap: Snapshot) -> dict[str, set[str]]:
    """The ids of every OP row the snapshot was read from, as `read_ids` gives them
    (rows that could not be parsed but name their ids included)."""
    sep = ID_SEP
    out: dict[str, set[str]] = {
        "patients": set(snap.patients),
        "contacts": set(snap.contacts),
        "family_contacts": {f"{f.patient_id}{sep}{f.contact_id}" for f in snap.family},
    }
    for rec in snap.invalid:
        table = rec.source.split(".")[0]
        if table == "patients" and rec.patient_id:
            out["patients"].add(rec.patient_id)
        elif table == "contacts" and rec.contact_id:
            out["contacts"].add(rec.contact_id)
        elif table == "family_contacts" and rec.patient_id and rec.contact_id:
            out["family_contacts"].add(f"{rec.patient_id}{sep}{rec.contact_id}")
    return out


def resolve_scope(snap: Snapshot, req: ScopeRequest) -> Scope:
    if req.kind == "patient" and req.target:
        return for_patient(snap, req.target)
    if req.kind == "contact" and req.target:
        return for_contact(snap, req.target)
    return ALL


def recent_ids(snap: Snapshot, now: datetime, delay: timedelta) -> frozenset[str]:
    """OP patient and contact ids touched within the propagation delay."""
    cutoff = now - delay
    # A blank time counts as recent (CheckContext.recent).
    ids = {p.patient_id for p in snap.patients.values()
           if p.updated_at is None or p.updated_at > cutoff}
    ids |= {c.contact_id for c in snap.contacts.values()
            if c.updated_at is None or c.updated_at > cutoff}
    for fc in snap.family:
        if fc.updated_at is None or fc.updated_at > cutoff:
            ids.add(fc.patient_id)
            ids.add(fc.contact_id)
    return frozenset(ids)


def reconcile(
    deps: Deps,
    request: ScopeRequest = ScopeRequest(),
    *,
    kind: str = "adhoc",
    dry_run: bool = False,
    now: datetime | None = None,
    task_id: str | None = None,
    snapshot: Snapshot | None = None,
    scope_override: Scope | None = None,
    population: int | None = None,
    defer_fixes: bool = False,
    keep_op_ids: bool = False,
    write_section: Callable[[], AbstractContextManager[Ceded | None]] | None = None,
    files: FileShares | None = None,
    keep_duplicate_index: bool = False,
) -> RunResult:
    """Run every check on a fresh read and fold the result into the state database.

    With `dry_run` nothing is written: the same transaction is rolled back. `population`
    (patients in the practice, for the mass-change guard) defaults to the snapshot's: an
    incremental run, whose snapshot is a neighbourhood, passes the practice's. With
    `defer_fixes` (a shard of a sharded scan) planned fixes are journaled as deferred,
    not queued, and the guard is left to whoever settles the whole run.
    `write_section` (a practice scan's, worker.scan.locks.practice_write) is entered
    around the state writes and yields the ids to leave to newer family runs.

    `files`: the unreadable shares a partial run measured outside its snapshot (a
    shard's whole streams, an incremental scan's changed rows), which decide the
    unreadable limit as a whole run's snapshot does. A partial run that read no file
    whole (an incremental or family run) also keeps to the last whole read's verdict
    (BLIND_KEY "over"): no fixes while a file was over the limit then.
    `keep_duplicate_index`: return what the duplicate matcher learned (a full scan).
    """
    settings = deps.settings
    practice = settings.practice
    now = now or utcnow()
    t0 = time.perf_counter()
    trace: list[str] = []
    bound = log.bind(run_kind=kind, scope=request.label, dry_run=dry_run)

    run_id = None if dry_run else _start_run(deps, kind, request, now, task_id)
    # A process that froze objects itself (before forking, say) keeps its freeze.
    own_freeze = gc.get_freeze_count() == 0
    try:
        snap = snapshot if snapshot is not None else read_snapshot(deps.op, deps.portal)
        t_read = time.perf_counter() - t0
        # The snapshot's million objects hold no cycles: keep the cyclic GC from
        # rescanning them while the checks and the state writes allocate (~1.5 s at
        # 100,000 patients). Undone below, so later garbage is collected as usual.
        if own_freeze:
            gc.freeze()
        scope = scope_override or resolve_scope(snap, request)
        trace.append(f"read {snap.records} records from OP and the portal in {t_read:.2f}s")
        if scope.kind in ("patient", "contact") and scope.target:
            trace.append(_describe_scope(snap, scope))
            trace.extend(describe(snap, scope.kind, scope.target))

        whole = scope_override is None
        carried: dict[str, Any] = {}
        if not whole:
            # A neighbourhood holds no row that names no id: what the last whole read
            # could not conclude from, this one cannot either.
            with deps.sessions() as early:
                kept = kv_get(early, practice, BLIND_KEY) or {}
            snap.unknown.blind.update(kept.get("tables", []))
            if files is None or files.lower_bound:
                carried = dict(kept.get("over") or {})
            if files is not None:
                snap.unknown.blind.update(files.blind)

        t1 = time.perf_counter()
        ctx = CheckContext(
            snapshot=snap,
            now=now,
            propagation_delay=settings.propagation_delay,
            welcome_window=settings.welcome_window,
            unreadable_percent=settings.unreadable_alert_percent,
            unreadable_min_rows=settings.unreadable_alert_min_rows,
            whole=whole,
            duplicate_threshold=settings.duplicate_match_threshold,
            files=files,
            carried={t: (int(v.get("bad") or 0), int(v.get("total") or 0))
                     for t, v in carried.items()},
            keep_duplicate_index=keep_duplicate_index,
        )
        every = run_checks(ctx)
        findings = [f for f in every if scope.covers_finding(f)]
        # OP-side problems just outside the scope still hold back the portal fixes of
        # their family (root cause first): a narrow run must plan as a full one would.
        outside = [f for f in every if f.check in BLOCKERS and scope.covers_check(f.check)
                   and not scope.covers_finding(f)]
        t_check = time.perf_counter() - t1
        trace.append(
            f"ran the checks in {t_check:.2f}s: {len(findings)} finding(s) in scope"
            + (
                f"; {ctx.suppressed_recent} cross-system comparison(s) skipped because OP "
                "changed within the propagation delay"
                if ctx.suppressed_recent
                else ""
            )
            + (
                f"; {ctx.suppressed_unknown} comparison(s) not made because a row they "
                "rest on could not be read"
                if ctx.suppressed_unknown
                else ""
            )
        )

        # A practice scan writes under the state write lock, leaving alone the ids a
        # family run wrote from a newer read meanwhile (worker.scan.locks).
        phase = write_section() if write_section is not None and not dry_run else nullcontext()
        with phase as ceded:
            if ceded:
                scope = replace(scope, ceded_patients=ceded.patients,
                                ceded_contacts=ceded.contacts, ceded_users=ceded.users)
                findings = [f for f in findings if scope.covers_finding(f)]
                trace.append(
                    f"left {len(ceded.patients)} patient(s), {len(ceded.contacts)} "
                    f"contact(s) and {len(ceded.users)} portal user(s) to on-call runs "
                    "that read them after this scan did"
                )
            session = deps.sessions()
            try:
                rules = time_rules(settings)
                result_sync = sync(
                    session, practice, findings, scope, now, rules, run_id,
                    recent_ids(snap, now, settings.propagation_delay),
                    unknown=snap.unknown,
                    blind=bool(snap.unknown.blind or ctx.over_limit()),
                )
                gate = FixGate(
                    portal_writable=deps.portal_writable,
                    paused=bool((kv_get(session, practice, "paused") or {}).get("paused")),
                    breaker_open=_breaker_open(session, practice, now),
                    unreadable=_unreadable_reason(ctx) or carried_reason(carried),
                )
                plan = make_plan(
                    findings, result_sync.rows, settings, now, gate,
                    population=population or len(snap.patients),
                    welcome_recently_resent=_recent_resends(session, practice, now, settings),
                    guard=not defer_fixes,
                    other_blockers=[
                        *_blockers_out_of_scope(session, practice, scope, settings),
                        *_unsilenced(session, practice, outside, settings),
                    ],
                )
                action_ids: list[int] = []
                if dry_run:
                    session.rollback()  # a dry run leaves the state database untouched
                else:
                    action_ids = _journal(session, plan, result_sync, now, run_id,
                                          defer=defer_fixes)
                    over = ctx.measured_over()
                    if whole:
                        kv_set(session, practice, BLIND_KEY, {
                            "tables": sorted(snap.unknown.blind | set(over)),
                            "over": unreadable_verdict(over, run_id, now),
                        }, now)
                    elif over and files is not None and files.lower_bound:
                        # A file found over the limit among the changed rows stays so
                        # for later partial runs (which may not read those rows again)
                        # until a full read finds it readable.
                        kept = kv_get(session, practice, BLIND_KEY) or {}
                        kv_set(session, practice, BLIND_KEY, {
                            "tables": sorted(set(kept.get("tables", [])) | set(over)),
                            "over": {**(kept.get("over") or {}),
                                     **unreadable_verdict(over, run_id, now)},
                        }, now)
                    elapsed = time.perf_counter() - t0
                    _finish_run(session, run_id, kind, snap, plan, result_sync, now, elapsed)
                    session.commit()
            finally:
                session.close()
        total = time.perf_counter() - t0
        for item in plan.items:
            trace.append(
                f"{item.finding.check} [{item.finding.fingerprint}] → {item.decision}: "
                f"{item.reason}"
            )
        result = RunResult(
            run_id=run_id, kind=kind, scope=scope, plan=plan, counts=snap.counts(),
            sync=result_sync, dry_run=dry_run, read_seconds=t_read, check_seconds=t_check,
            total_seconds=total, suppressed_recent=ctx.suppressed_recent,
            action_ids=action_ids, trace=trace,
            op_ids=op_row_ids(snap) if keep_op_ids else None,
            learned_duplicates=ctx.learned_duplicates[0] if ctx.learned_duplicates else None,
        )
        bound.info("run_finished", run_id=run_id, **{
            k: v for k, v in result.summary().items() if k in ("records", "findings", "new",
                                                                "resolved", "seconds")
        })
        return result
    except BaseException as err:
        if run_id is not None:
            _fail_run(deps, run_id, err)
        raise
    finally:
        if own_freeze:
            gc.unfreeze()


def _unreadable_reason(ctx: CheckContext) -> str | None:
    over = ctx.measured_over()
    if not over:
        return None
    least = "at least " if ctx.files is not None and ctx.files.lower_bound else ""
    files = ", ".join(f"{t} ({least}{bad} of {total} rows)" for t, (bad, total) in over.items())
    return f"too much of the input cannot be read ({files}): no fixes this run"


def _describe_scope(snap: Snapshot, scope: Scope) -> str:
    target = scope.target or ""
    known = target in (snap.patients if scope.kind == "patient" else snap.contacts)
    if not known:
        return f"{scope.kind} {target} is not in OP: only portal-side findings can match it"
    return (
        f"{scope.kind} {target}: {len(scope.patient_ids)} chart(s), "
        f"{len(scope.contact_ids)} contact(s), {len(scope.user_ids)} portal user(s) in scope"
    )


def _start_run(
    deps: Deps, kind: str, request: ScopeRequest, now: datetime, task_id: str | None
) -> int:
    with deps.sessions() as session, session.begin():
        run = Run(
            practice=deps.settings.practice, kind=kind, scope=request.label, status="running",
            started_at=now, task_id=task_id,
        )
        session.add(run)
        session.flush()
        if task_id:
            # A redelivered or retried task keeps its id. An earlier attempt still marked
            # running died with its worker or lost the state database (this attempt holds
            # the scan lock it held), so it will never finish: say so.
            session.execute(
                update(Run)
                .where(Run.practice == run.practice, Run.task_id == task_id,
                       Run.status == "running", Run.id != run.id)
                .values(status="failed", finished_at=now,
                        error=f"interrupted: its worker or state database was lost; "
                              f"retried as run {run.id}")
            )
        return run.id


def _finish_run(
    session: Session, run_id: int | None, kind: str, snap: Snapshot, plan: Plan,
    res: SyncResult, now: datetime, elapsed: float,
) -> None:
    run = session.get(Run, run_id)
    assert run is not None
    counts = plan.counts()
    run.status = "succeeded"
    run.finished_at = now + timedelta(seconds=elapsed)
    run.records_read = snap.records
    run.findings_total = len(plan.items)
    run.findings_new = res.new
    run.findings_resolved = res.resolved
    run.fixes_queued = counts.get(Decision.FIX, 0)
    run.alerts = counts.get(Decision.ALERT, 0) + counts.get(Decision.ESCALATED, 0)
    run.summary = {
        "by_check": dict(plan.by_check()),
        "by_decision": dict(counts),
        "guard": plan.guard_reason or None,
    }
    if kind in ("full", "incremental", "adhoc", "demo") and run.scope == "all":
        kv_set(session, run.practice, "last_success", {"at": now.isoformat(), "run_id": run_id,
                                                        "kind": kind}, now)


def _fail_run(deps: Deps, run_id: int, err: BaseException) -> None:
    try:
        with deps.sessions() as session, session.begin():
            run = session.get(Run, run_id)
            if run is not None:
                run.status = "failed"
                run.finished_at = utcnow()
                run.error = failures.cause_text(err)
                run.summary = {**(run.summary or {}), "part": failures.failure_part(err)}
        failures.mark_recorded(err, run_id)
    except Exception:  # the state DB itself may be what failed
        log.exception("run_fail_not_recorded", run_id=run_id)


def _journal(
    session: Session, plan: Plan, res: SyncResult, now: datetime, run_id: int | None,
    *, defer: bool = False,
) -> list[int]:
    """Commit an intent for every planned fix (and a staged row for every held one).

    One action per finding episode and attempt: a batch staged by the mass-change guard
    is found again by the next scan and neither re-staged nor re-alerted. A deferred
    action (a shard's, `defer`) is adopted by the next run that plans the same fix, so
    one left behind by a sharded scan that failed is never stranded.
    """
    ids: list[int] = []
    staged: list[str] = []  # practice of each newly staged action
    for item in plan.items:
        if item.decision not in (Decision.FIX, Decision.STAGED):
            continue
        row = res.rows[item.finding.fingerprint]
        attempt = row.fix_attempts + 1
        key = _action_key(row, attempt)
        if defer:
            status = ActionStatus.DEFERRED
        elif item.decision is Decision.FIX:
            status = ActionStatus.INTENT
        else:
            status = ActionStatus.STAGED
        action = session.scalar(select(ActionRow).where(ActionRow.idempotency_key == key))
        if action is None:
            action = ActionRow(
                practice=row.practice, finding_id=row.id, run_id=run_id,
                kind=str(item.finding.fix), idempotency_key=key,
                params=_params(item.finding), status=status, created_at=now,
                coalesce_key=coalesce_key(item.finding),
            )
            session.add(action)
            session.flush()
        elif action.status == ActionStatus.DEFERRED:
            action.status, action.run_id = status, run_id
            action.params = _params(item.finding)
        else:
            continue
        if status is ActionStatus.INTENT:
            primary = coalesce_intent(session, action, row, now, run_id)
            if primary is not None:
                item.reason = f"{item.reason}; served by fix {primary} (one per portal user)"
                continue
            transition(session, row, S.FIX_QUEUED, now, f"fix queued: {action.kind}", run_id)
            ids.append(action.id)
        elif status is ActionStatus.STAGED:
            staged.append(row.practice)
    if staged and run_id is not None:
        # The one staff alert for this batch: durable, read by the digest and `status`.
        kv_set(session, staged[0], "guard", {
            "run_id": run_id, "reason": plan.guard_reason, "at": now.isoformat(),
            "staged": len(staged), "status": "pending",
        }, now)
        log.warning("mass_change_guard_tripped", run_id=run_id, staged=len(staged))
    return ids


def _action_key(row: FindingRow, attempt: int) -> str:
    """fingerprint:episode:attempt. The episode (practice + when the finding was last
    first seen) changes when a resolved finding reopens, so a fix that recurs months later
    is not mistaken for the old one; within an episode the key is stable across scans."""
    episode = hashlib.sha1(
        f"{row.practice}|{row.first_seen_at.astimezone(UTC).isoformat()}".encode()
    ).hexdigest()[:8]
    return f"{row.fingerprint}:{episode}:{attempt}"


def _params(f: Any) -> dict[str, Any]:
    """Ids only: a parent's address is read from OP when the resend is applied
    (worker.fixes.apply.current_email), never kept in the journal — only a salted key of
    it, for the once-per-address rule. The dummy address is made of ids, not a person's
    data."""
    params: dict[str, Any] = {
        "patient_id": f.patient_id, "contact_id": f.contact_id, "user_id": f.portal_user_id,
    }
    if f.fix is FixKind.SET_DUMMY_EMAIL:
        params["email"] = dummy_email(f.patient_id, f.portal_user_id)
    elif f.fix is FixKind.RESEND_WELCOME:
        params["address"] = address_key(f.contact_id, str(f.data.get("email") or ""))
    return params


def coalesce_key(f: Any) -> str | None:
    """One call of a kind per portal user serves every finding of that user: a source
    refresh resyncs all of the user's links at once."""
    if f.fix is FixKind.REFRESH_SOURCE and f.portal_user_id:
        return f"{f.fix}:{f.portal_user_id}"
    return None


_COALESCE_LIVE = (ActionStatus.INTENT, ActionStatus.RETRYING, ActionStatus.APPLYING)
_COALESCE_DONE = (ActionStatus.APPLIED, ActionStatus.ALREADY, ActionStatus.UNCONFIRMED)


def coalesce_intent(
    session: Session, action: ActionRow, row: FindingRow, now: datetime, run_id: int | None,
    *, because: str | None = None,
) -> int | None:
    """Attach a new intent to the same user's refresh that is queued, running, or whose
    hold has not ended: it makes no call of its own and its finding is verified with
    that one. Returns the primary fix's id, or None when this intent is the primary.
    `because` (e.g. who released a staged fix) leads the finding's event."""
    lead = f"{because}; " if because else ""
    if action.coalesce_key is None:
        return None
    candidates = session.scalars(
        select(ActionRow).where(
            ActionRow.practice == action.practice,
            ActionRow.coalesce_key == action.coalesce_key,
            ActionRow.coalesced_into.is_(None),
            ActionRow.id != action.id,
            ActionRow.status.in_([*_COALESCE_LIVE, *_COALESCE_DONE]),
        ).order_by(ActionRow.id.desc())
    ).all()
    for primary in candidates:
        if primary.status in _COALESCE_LIVE:
            action.status = ActionStatus.COALESCED
            action.coalesced_into = primary.id
            transition(session, row, S.FIX_QUEUED, now,
                       f"{lead}fix {action.kind} served by fix {primary.id} (one per portal "
                       "user)", run_id)
            return primary.id
        served = session.get(FindingRow, primary.finding_id)
        if served is not None and served.state == S.HELD and served.next_check_at is not None \
                and served.next_check_at > now:
            action.status = ActionStatus.COALESCED
            action.coalesced_into = primary.id
            action.applied_at = primary.applied_at
            action.error = f"served by fix {primary.id} ({primary.status})"
            row.fix_attempts += 1
            row.next_check_at = served.next_check_at
            transition(session, row, S.HELD, now,
                       f"{lead}fix {action.kind} for this portal user already made by fix "
                       f"{primary.id}; verifying with it", run_id)
            return primary.id
    return None


def dummy_email(patient_id: str | None, user_id: str | None) -> str:
    local = "".join(ch for ch in f"{patient_id or 'p'}.{user_id or 'u'}".lower()
                    if ch.isalnum() or ch in ".-_")
    return f"{local}@dummy.com"


def _breaker_open(session: Session, practice: str, now: datetime) -> bool:
    state = kv_get(session, practice, "breaker") or {}
    if state.get("state") != "open":
        return False
    # Past its cooldown the breaker lets one probe through (worker.fixes.rails): plan fixes
    # again so there is a call to probe with, or it would stay open for ever.
    until = state.get("until")
    return until is None or now < datetime.fromisoformat(until)


def _blockers_out_of_scope(
    session: Session, practice: str, scope: Scope, settings: Settings
) -> list[FindingRow]:
    """Open blocker rows of checks this run's scope leaves out (duplicate groups in an
    incremental scan): they still hold back the portal fixes of their family."""
    checks = [c for c in BLOCKERS if not scope.covers_check(c)
              and settings.policy_for(c, default_policy(c)) is not Policy.OFF]
    if not checks:
        return []
    return list(session.scalars(select(FindingRow).where(
        FindingRow.practice == practice,
        FindingRow.check.in_(checks),
        FindingRow.state.not_in([S.RESOLVED, S.SILENCED]),
    )))


def _unsilenced(
    session: Session, practice: str, found: list[Any], settings: Settings
) -> list[Any]:
    """The findings among `found` that staff have neither silenced nor turned off."""
    found = [f for f in found
             if settings.policy_for(f.check, default_policy(f.check)) is not Policy.OFF]
    if not found:
        return []
    silenced: set[str] = set()
    fps = [f.fingerprint for f in found]
    for i in range(0, len(fps), 500):
        silenced.update(session.scalars(select(FindingRow.fingerprint).where(
            FindingRow.practice == practice, FindingRow.fingerprint.in_(fps[i:i + 500]),
            FindingRow.state == S.SILENCED)))
    return [f for f in found if f.fingerprint not in silenced]


def _recent_resends(
    session: Session, practice: str, now: datetime, settings: Settings
) -> frozenset[tuple[str, str]]:
    """(contact id, address key) of every Welcome email resent within the window.

    Keyed by the address too: the guide recommends a resend especially when the parent
    has a new email address, so a resend to the old one does not hold back the new one.
    The journal keeps a salted key of the address sent (worker.model.text.address_key),
    never the address.
    """
    since = now - settings.welcome_window
    rows = session.scalars(
        select(ActionRow).where(
            ActionRow.practice == practice,
            ActionRow.kind == FixKind.RESEND_WELCOME,
            ActionRow.status.in_([ActionStatus.APPLIED, ActionStatus.ALREADY]),
            ActionRow.applied_at >= since,
        )
    )
    return frozenset(
        (str(r.params["contact_id"]), str(r.params.get("address") or ""))
        for r in rows if r.params.get("contact_id")
    )


def due_holds(sessions: sessionmaker[Session], practice: str, now: datetime) -> list[FindingRow]:
    with sessions() as session:
        return list(
            session.scalars(
                select(FindingRow).where(
                    FindingRow.practice == practice,
                    FindingRow.state == S.HELD,
                    FindingRow.next_check_at <= now,
                )
            )
        )
