"""Sharded full scans: one full scan as N independent shard tasks, combined in the state DB.

Why: a hosted deployment scales a full scan out by adding workers. Not a Celery chord
(CELERY.md §1 row 8): the coordinator writes a parent `runs` row (kind "full", summary
{"shards": N, "done": [], "failed": {}, "runs": {}}) and enqueues N independent tasks;
each shard marks itself on that row under a row lock, and the last one marks it
succeeded and moves the watermark and kv "last_success" as `full_reconcile` does.

Ownership, not coverage: a finding names up to three ids, and under `Scope.covers` two
shards could both raise or resolve it (racing on one row). Here every finding has one
owner: the shard of its first *known* id — an OP patient, else an OP contact, else a
portal user (ids read from those tables), by `stable_hash(id) % N` — and shard 0 for the
rest (no known id: unreadable rows without ids, links from unknown users) and for
`contact_duplicate` (groups of contacts, decided over all contacts). `ShardScope.covers`
answers ownership, so `reconcile` and `lifecycle._load_rows` let exactly one shard
decide each finding.

Reads: each shard streams patients, contacts and portal users (for the ids and their
owners), the audit table (Welcome events, small), then builds the incremental scan's
neighbourhood (`worker.scan.incremental.neighbourhood`, targeted reads) of the ids it owns, so
each owned finding comes out exactly as in a full scan. Shard 0 also keeps every contact
(`contact_duplicate`) and streams family contacts, links and sources for the rows no
other shard can own. With CSV exports every read streams the file: sharding pays only
with a SQL OP source (docs/benchmarks.md, "Scaling out").

Fixes: a shard journals its fixes as deferred; the last shard counts them all against
the mass-change guard (`settle_fixes`), so a mass change spread over N shards is stopped
exactly as one full scan would stop it.

Unreadable files: every shard streams patients, contacts, portal users and the audit
whole, and shard 0 also family contacts, links and sources; each counts the readable
and unreadable rows of what it streams (`FileTally`), so the share of each file is the
one a full scan finds. Another shard whose neighbourhood holds an unreadable row of
family contacts, links or sources streams that file whole too (a cost paid only when
the file has such rows), so it folds those rows into the file's alert as a full scan
does instead of raising one finding per row. A file over `unreadable_alert_percent` is
one high alert (raised by shard 0, which owns findings that name no id), the shards
that measured it plan no fixes and resolve nothing, and `settle_fixes` releases none
of the run's fixes; the verdict is kept (kv "blind_tables") for the partial runs after
it, as a full scan's is.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from config.settings import Settings
from worker.model.records import (
    WELCOME_ACTION,
    AuditEvent,
    CaregiverLink,
    Contact,
    InvalidRecord,
    Patient,
    PortalUser,
)
from worker.model.scope import Scope
from worker.model.snapshot import FileShares, FileTally, shares_over
from worker.scan.engine import (
    BLIND_KEY,
    Deps,
    RunResult,
    ScopeRequest,
    coalesce_intent,
    reconcile,
    unreadable_verdict,
    utcnow,
)
from worker.scan.incremental import WATERMARK, Ids, Reads, WriteSection, neighbourhood
from worker.scan.lifecycle import transition
from worker.scan.locks import ScanBusy, _take_over, holder_token, redis_client
from worker.scan.planner import guard_verdict
from worker.state.db import kv_set
from worker.state.models import ActionRow, ActionStatus, FindingRow, Run
from worker.state.models import FindingState as S

log = structlog.get_logger(__name__)

PARENT_KIND = "full"
SHARD_KIND = "shard"
DUPLICATES = frozenset({"contact_duplicate"})
# The files every shard streams whole; shard 0 streams the others whole too.
STREAMED = ("patients", "contacts", "portal_users", "portal_audit")
ALL_FILES = (*STREAMED, "family_contacts", "portal_links", "portal_sources")


class ShardedScanRunning(RuntimeError):
    """A sharded full scan of this practice is still running."""


def stable_hash(key: str) -> int:
    """The same in every process (`hash()` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def shard_of(key: str, count: int) -> int:
    return stable_hash(key) % count


@dataclass(frozen=True)
class ShardScope(Scope):
    """A scope that owns findings instead of covering them (module docstring)."""

    index: int = 0
    count: int = 1
    known_patients: frozenset[str] = frozenset()
    known_contacts: frozenset[str] = frozenset()
    known_users: frozenset[str] = frozenset()

    def owner(
        self, patient_id: str | None, contact_id: str | None, portal_user_id: str | None,
        contact_ids: list[str] | tuple[str, ...] | None = None,
    ) -> int:
        if contact_ids:  # a duplicate group: decided by the shard that reads all contacts
            return 0
        for key, known in ((patient_id, self.known_patients),
                           (contact_id, self.known_contacts),
                           (portal_user_id, self.known_users)):
            if key and key in known:
                return shard_of(key, self.count)
        return 0

    def covers(
        self, patient_id: str | None, contact_id: str | None, portal_user_id: str | None,
        contact_ids: list[str] | tuple[str, ...] | None = None, check: str | None = None,
    ) -> bool:
        if self.cedes(patient_id, contact_id, portal_user_id, contact_ids):
            return False  # a family run wrote it from a newer read (worker.scan.locks)
        return self.owner(patient_id, contact_id, portal_user_id, contact_ids) == self.index


# -- the parent row ---------------------------------------------------------------------


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def stale_after(settings: Settings, count: int) -> timedelta:
    """How long a sharded scan may run before a new one may replace it: shards queued
    behind each other on few workers each take up to the lock timeout."""
    return timedelta(seconds=max(settings.broker_visibility_timeout_seconds,
                                 settings.lock_timeout_seconds * count))


def running_parent(deps: Deps, now: datetime | None = None) -> Run | None:
    """The sharded full scan still running, if any; one past `stale_after` is marked
    failed (its shards died or were lost) so it cannot block full scans for ever."""
    now = now or utcnow()
    settings = deps.settings
    with deps.sessions() as session, session.begin():
        rows = session.scalars(
            select(Run).where(Run.practice == settings.practice, Run.kind == PARENT_KIND,
                              Run.status == "running").order_by(Run.id.desc())
        ).all()
        for run in rows:
            count = int((run.summary or {}).get("shards") or 0)
            if not count:
                continue
            if _aware(run.started_at) + stale_after(settings, count) < now:
                run.status = "failed"
                run.finished_at = now
                run.error = "stale: its shards did not all finish in time"
                continue
            session.expunge(run)
            return run
    return None


def start(deps: Deps, count: int, *, now: datetime | None = None,
          task_id: str | None = None) -> int:
    """Create the parent row of a sharded full scan (the caller holds the practice lock
    and enqueues the shards). Refused while another sharded scan runs."""
    now = now or utcnow()
    busy = running_parent(deps, now)
    if busy is not None:
        raise ShardedScanRunning(f"sharded full scan run {busy.id} is still running")
    with deps.sessions() as session, session.begin():
        run = Run(practice=deps.settings.practice, kind=PARENT_KIND, scope="all",
                  status="running", started_at=now, task_id=task_id,
                  summary={"shards": count, "done": [], "failed": {}, "runs": {}})
        session.add(run)
        session.flush()
        return run.id


def fail_parent(deps: Deps, parent_id: int, reason: str) -> None:
    with deps.sessions() as session, session.begin():
        parent = session.get(Run, parent_id)
        if parent is not None and parent.status == "running":
            parent.status, parent.error, parent.finished_at = "failed", reason[:500], utcnow()


def _locked_parent(session: Session, parent_id: int) -> Run:
    """The parent row, locked until commit. The no-op UPDATE first takes the write lock
    (a row lock on PostgreSQL, the database's on SQLite) before anything is read, so two
    shards finishing together serialize instead of losing an update or deadlocking."""
    session.execute(update(Run).where(Run.id == parent_id).values(status=Run.status))
    parent = session.get(Run, parent_id, with_for_update=True, populate_existing=True)
    if parent is None:
        raise LookupError(f"no sharded scan run {parent_id}")
    return parent


def mark_shard(
    deps: Deps, parent_id: int, index: int, *, run: RunResult | None = None,
    population: int | None = None, error: str | None = None, now: datetime | None = None,
    released: list[int] | None = None, files: FileShares | None = None,
) -> str:
    """Record one shard's outcome on the parent; the last shard to succeed finishes the
    scan and settles the fixes every shard deferred (`settle_fixes`), appending the ids
    of those it released to `released` for the caller to enqueue after the commit.
    `files`: the unreadable shares of the files the shard streamed whole; the finished
    scan keeps the verdict for the runs after it (kv "blind_tables").
    Idempotent: a shard that runs again leaves the same marks. Returns the parent's
    status."""
    now = now or utcnow()
    practice = deps.settings.practice
    with deps.sessions() as session, session.begin():
        parent = _locked_parent(session, parent_id)
        summary = dict(parent.summary or {})
        count = int(summary.get("shards") or 0)
        done = set(summary.get("done") or [])
        failed = dict(summary.get("failed") or {})
        runs = dict(summary.get("runs") or {})
        counts = dict(summary.get("counts") or {})
        unreadable = dict(summary.get("unreadable") or {})
        if error is not None:
            failed[str(index)] = error[:300]
        else:
            done.add(index)
            failed.pop(str(index), None)
            if run is not None:  # a rerun replaces its shard's entry, never adds to it
                runs[str(index)] = run.run_id
                counts[str(index)] = {k: v for k, v in run.summary().items()
                                      if k in ("findings", "new", "resolved")}
            if files is not None:
                settings = deps.settings
                unreadable[str(index)] = {
                    "over": {t: list(v) for t, v in shares_over(
                        files.shares, settings.unreadable_alert_percent,
                        settings.unreadable_alert_min_rows).items()},
                    "blind": sorted(files.blind),
                }
        if population is not None:
            summary.setdefault("patients", population)  # for later incremental guards
        summary.update(done=sorted(done), failed=failed, runs=runs, counts=counts,
                       unreadable=unreadable)
        parent.summary = summary
        if failed:
            if parent.status == "running":
                parent.status, parent.finished_at = "failed", now
            parent.error = "; ".join(f"shard {k}: {v}" for k, v in sorted(failed.items()))[:500]
        elif len(done) >= count and parent.status != "succeeded":
            parent.status, parent.finished_at, parent.error = "succeeded", now, None
            at = _aware(parent.started_at).isoformat()
            kv_set(session, practice, WATERMARK, {
                "at": at, "run_id": parent_id, "kind": PARENT_KIND,
                "patients": summary.get("patients"),
            }, now)
            kv_set(session, practice, "last_success",
                   {"at": at, "run_id": parent_id, "kind": PARENT_KIND}, now)
            over, blind = _unreadable(summary)
            kv_set(session, practice, BLIND_KEY, {
                "tables": sorted(blind | set(over)),
                "over": unreadable_verdict(over, parent_id, now),
            }, now)
            ids = settle_fixes(session, deps.settings, parent, now)
            if released is not None:
                released.extend(ids)
        return parent.status


def _unreadable(summary: dict[str, Any]) -> tuple[dict[str, tuple[int, int]], set[str]]:
    """The files the shards found over the unreadable limit, and those with a row that
    names no id, as the shards that streamed them whole reported them."""
    over: dict[str, tuple[int, int]] = {}
    blind: set[str] = set()
    for report in (summary.get("unreadable") or {}).values():
        for table, (bad, total) in (report.get("over") or {}).items():
            over[table] = (int(bad), int(total))
        blind.update(report.get("blind") or ())
    return over, blind


def settle_fixes(session: Session, settings: Settings, parent: Run, now: datetime) -> list[int]:
    """The mass-change guard over a whole sharded run: each shard deferred its fixes, and
    here, with all of them planned, they are counted together against the practice's
    population. Within the guard each becomes an intent (its finding fix_queued) and
    the ids are returned; over it, the whole batch is staged under the parent run, with
    one alert, for `oprecon fixes approve|reject <parent run>`.

    When a shard found a file over the unreadable limit, none is released: they stay
    deferred (the next run that plans the same fix, once the files read, adopts them),
    as a full scan over such a file plans none."""
    summary = parent.summary or {}
    shard_runs = [int(r) for r in (summary.get("runs") or {}).values()]
    if not shard_runs:
        return []
    over, _ = _unreadable(summary)
    if over:
        files = ", ".join(f"{t} ({bad} of {total} rows)" for t, (bad, total) in over.items())
        parent.summary = {**summary, "fixes_withheld": (
            f"too much of the input cannot be read ({files}): no fixes this run")}
        log.warning("sharded_fixes_withheld", run_id=parent.id, files=sorted(over))
        return []
    actions = list(session.scalars(
        select(ActionRow).where(ActionRow.practice == settings.practice,
                                ActionRow.run_id.in_(shard_runs),
                                ActionRow.status == ActionStatus.DEFERRED)
        .order_by(ActionRow.id).with_for_update()
    ))
    if not actions:
        return []
    population = int(summary.get("patients") or 0)
    reason = guard_verdict(len(actions), settings, population)
    if reason is not None:
        for action in actions:
            action.status, action.run_id = ActionStatus.STAGED, parent.id
        kv_set(session, settings.practice, "guard", {
            "run_id": parent.id, "reason": reason, "at": now.isoformat(),
            "staged": len(actions), "status": "pending",
        }, now)
        log.warning("mass_change_guard_tripped", run_id=parent.id, staged=len(actions),
                    shards=len(shard_runs))
        return []
    ids: list[int] = []
    for action in actions:
        finding = session.get(FindingRow, action.finding_id)
        if finding is None or finding.state != S.OPEN:
            continue  # decided otherwise meanwhile (an ad hoc run, a silence): the next
            # run that plans this fix adopts the deferred row
        action.status = ActionStatus.INTENT
        session.flush()
        if coalesce_intent(session, action, finding, now, action.run_id) is not None:
            continue  # served by the same portal user's refresh: no call of its own
        transition(session, finding, S.FIX_QUEUED, now,
                   f"fix queued: {action.kind} (sharded run {parent.id}, within the "
                   "mass-change guard)", action.run_id)
        ids.append(action.id)
    return ids


# -- one shard ----------------------------------------------------------------------------


@dataclass
class _Ownership:
    """What a shard learns from its streams: every known id, its own, and (shard 0) the
    rows no targeted read finds."""

    patients: set[str]
    contacts: set[str]
    users: set[str]
    mine: Ids
    population: int
    all_contacts: list[Contact]
    audit: list[Any]
    extra: list[Any]
    files: FileShares


def _learn(deps: Deps, index: int, count: int) -> _Ownership:
    op, portal = deps.op, deps.portal
    first = index == 0
    patients: set[str] = set()
    contacts: set[str] = set()
    users: set[str] = set()
    extra: list[Any] = []
    all_contacts: list[Contact] = []
    population = 0
    tally = FileTally()  # the unreadable share of every file streamed whole here
    for p in tally.count("patients", op.patients()):
        if isinstance(p, Patient):
            population += 1
            patients.add(p.patient_id)
        elif p.patient_id:
            patients.add(p.patient_id)
        elif first:
            extra.append(p)  # an unreadable row without an id: nobody's but shard 0's
    for c in tally.count("contacts", op.contacts()):
        if isinstance(c, Contact):
            contacts.add(c.contact_id)
            if first:
                all_contacts.append(c)
        elif c.contact_id:
            contacts.add(c.contact_id)
        elif first and not (c.patient_id and c.patient_id in patients):
            extra.append(c)
    for u in tally.count("portal_users", portal.users()):
        if isinstance(u, PortalUser):
            users.add(u.user_id)
        elif u.portal_user_id:
            users.add(u.portal_user_id)
        elif first and not ((u.patient_id and u.patient_id in patients)
                            or (u.contact_id and u.contact_id in contacts)):
            extra.append(u)
    # Every Welcome event (the check keeps the latest per email) and unreadable row, as
    # a full scan reads them; the neighbourhood keeps those of its contacts and users.
    audit: list[Any] = []
    for event in tally.count("portal_audit", portal.audit()):
        if isinstance(event, AuditEvent):
            if event.action == WELCOME_ACTION and event.email:
                audit.append(event)
        elif event.portal_user_id and event.portal_user_id in users:
            audit.append(event)
        elif first:
            extra.append(event)

    mine = Ids(
        patients={p for p in patients if shard_of(p, count) == index},
        contacts={c for c in contacts if shard_of(c, count) == index},
        users={u for u in users if shard_of(u, count) == index},
    )
    if first:
        _rest(deps, patients, contacts, users, mine, extra, tally)
    files = tally.shares(ALL_FILES if first else STREAMED)
    return _Ownership(patients, contacts, users, mine, population, all_contacts, audit, extra,
                      files)


def _rest(deps: Deps, patients: set[str], contacts: set[str], users: set[str],
          mine: Ids, extra: list[Any], tally: FileTally) -> None:
    """Shard 0's share of the tables no shard reads in full: family contacts naming no
    known record, links from an unknown caregiver (their known end is read with its
    neighbourhood), and unreadable rows whose ids are unknown. Every row is counted
    into `tally`: shard 0 measures these files for the whole run."""
    for fc in tally.count("family_contacts", deps.op.family_contacts()):
        if not ((fc.patient_id and fc.patient_id in patients)
                or (fc.contact_id and fc.contact_id in contacts)):
            extra.append(fc)
    for link in tally.count("portal_links", deps.portal.links()):
        if isinstance(link, CaregiverLink):
            if link.caregiver_user_id not in users:
                extra.append(link)
                if link.dependent_user_id in users:
                    mine.users.add(link.dependent_user_id)
        elif not (link.portal_user_id and link.portal_user_id in users):
            extra.append(link)
    for source in tally.count("portal_sources", deps.portal.sources()):
        if isinstance(source, InvalidRecord) and not (
            source.portal_user_id and source.portal_user_id in users
        ):
            extra.append(source)


def _measure_rest(deps: Deps, files: FileShares, snap: Any) -> FileShares:
    """A shard other than 0 whose neighbourhood holds an unreadable row of family
    contacts, links or sources measures that file whole (module docstring)."""
    readers: dict[str, Callable[[], Iterable[Any]]] = {
        "family_contacts": deps.op.family_contacts, "portal_links": deps.portal.links,
        "portal_sources": deps.portal.sources}
    met = [t for t in readers if t not in files.shares and snap.unknown.unreadable.get(t)]
    if not met:
        return files
    tally = FileTally()
    for table in met:
        for _ in tally.count(table, readers[table]()):
            pass
    more = tally.shares(met)
    return FileShares({**files.shares, **more.shares}, {**files.examples, **more.examples},
                      blind=files.blind | more.blind)


def _snapshot(deps: Deps, own: _Ownership, index: int) -> tuple[Any, int]:
    reads = Reads(deps.op, deps.portal)
    snap = neighbourhood(reads, own.mine, own.audit, {})
    if index == 0:
        for contact in own.all_contacts:  # contact_duplicate compares every contact
            if contact.contact_id not in snap.contacts:
                snap.add(contact)
        for record in own.extra:
            snap.add(record)
    return snap, reads.rows


@contextmanager
def shard_lock(settings: Settings, index: int) -> Iterator[None]:
    """Two copies of one shard (a redelivery) never overlap; other shards and the
    practice lock are not involved. A holder that died on this host is taken over, as
    the practice lock's is (worker.scan.locks)."""
    lock = redis_client(settings).lock(
        f"oprecon:{settings.practice}:scan:shard:{index}",
        timeout=settings.lock_timeout_seconds, thread_local=False,
    )
    token = holder_token()
    if not (lock.acquire(blocking=False, token=token) or _take_over(lock, token)):
        raise ScanBusy(f"shard {index} of practice {settings.practice} is already running")
    try:
        yield
    finally:
        try:
            lock.release()
        except Exception:  # expired meanwhile: the next copy may own it
            log.warning("shard_lock_lost", shard=index)


def run_shard(
    deps: Deps, parent_id: int, index: int, count: int, *, now: datetime | None = None,
    task_id: str | None = None, write_section: WriteSection | None = None,
) -> RunResult:
    """Reconcile the findings this shard owns and mark it on the parent (the caller holds
    the shard lock). A failure marks the parent failed with the reason and re-raises.

    `write_section` (worker.scan.locks.practice_write, bound to this shard's read time)
    is entered around the state writes, as a practice scan's is: a family run that wrote
    from a newer read keeps its findings, and one that read before this shard reads
    again."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count}")
    now = now or utcnow()
    t0 = time.perf_counter()
    try:
        own = _learn(deps, index, count)
        snap, rows = _snapshot(deps, own, index)
        if index != 0:
            own.files = _measure_rest(deps, own.files, snap)
        t_read = time.perf_counter() - t0
        label = f"shard {index + 1}/{count} of run {parent_id}"
        scope = ShardScope(
            "entities", label, frozenset(own.mine.patients), frozenset(own.mine.contacts),
            frozenset(own.mine.users),
            exclude_checks=frozenset() if index == 0 else DUPLICATES,
            index=index, count=count, known_patients=frozenset(own.patients),
            known_contacts=frozenset(own.contacts), known_users=frozenset(own.users),
        )
        # Fixes wait for the other shards: the guard counts the whole run (settle_fixes).
        result = reconcile(
            deps, ScopeRequest("entities", label), kind=SHARD_KIND, now=now,
            task_id=task_id, snapshot=snap, scope_override=scope,
            population=own.population, defer_fixes=True, write_section=write_section,
            files=own.files,
        )
        result.read_seconds += t_read
        result.total_seconds += t_read
    except Exception as err:
        try:
            mark_shard(deps, parent_id, index, error=f"{type(err).__name__}: {err}", now=now)
        except Exception:  # the state DB may be what failed: keep the first error
            log.exception("shard_failure_not_recorded", parent_run_id=parent_id, shard=index)
        raise
    released: list[int] = []
    status = mark_shard(deps, parent_id, index, run=result, population=own.population,
                        now=now, released=released, files=own.files)
    result.action_ids = released  # enqueued by the task, now that they are committed
    log.info("shard_scan", parent_run_id=parent_id, shard=index, shards=count,
             run_id=result.run_id, rows_read=rows, owned_patients=len(own.mine.patients),
             parent_status=status, seconds=round(time.perf_counter() - t0, 3))
    return result
