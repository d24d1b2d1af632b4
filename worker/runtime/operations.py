"""What staff do to the state database, shared by the CLI and the web console.

Silence and unsilence a finding, pause and resume fixes, and read everything `oprecon
status` shows. The callers own the session's transaction and the wording around it; a
refusal is an `OperationRefused` with one line that says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from worker.runtime import health
from worker.runtime.health import fmt_seconds
from worker.scan.engine import utcnow
from worker.state.db import kv_get, kv_set
from worker.state.models import FindingEvent, FindingRow, Run
from worker.state.models import FindingState as S

RECENT_RUNS = 10
# kombu's Redis transport keeps priorities 3, 6 and 9 in sibling lists.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


class OperationRefused(Exception):
    """A staff action that cannot be done as asked; `str()` is one line."""


def iso(when: datetime | None) -> str | None:
    return when.isoformat() if when else None


def stamp(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%SZ") if when else ""


def relative(when: datetime | None, now: datetime) -> str:
    if when is None:
        return ""
    delta = (when - now).total_seconds()
    return f"in {fmt_seconds(delta)}" if delta > 0 else f"{fmt_seconds(delta)} ago"


def read_sessions(settings: Settings) -> sessionmaker[Session]:
    """Sessions for reading: no migration, and no SQLite file created by a mere look."""
    from worker.scan.wiring import state_sessions

    url = make_url(settings.state_db_url)
    db = url.database
    sqlite_file = url.get_backend_name() == "sqlite" and db not in (None, "", ":memory:")
    if sqlite_file and not Path(str(db)).exists():
        raise OperationRefused(f"no state database at {db}: nothing has run yet")
    return state_sessions(settings, migrate_first=False)


def write_sessions(settings: Settings) -> sessionmaker[Session]:
    from worker.scan.wiring import state_sessions

    return state_sessions(settings, migrate_first=True)


# -- one finding ---------------------------------------------------------------------------


def effective_state(row: FindingRow, now: datetime) -> str:
    """What staff should read: a silence past its end is over even before the next scan
    reopens the finding (the lifecycle ends it at `now >= silenced_until`)."""
    if row.state == S.SILENCED and row.silenced_until is not None and now >= row.silenced_until:
        return "silence ended"
    return str(row.state)


@dataclass(frozen=True)
class Waits:
    """What open findings wait on besides time, read once per listing: fixes the
    mass-change guard holds for staff (finding id → staged run) and open OP-side root
    causes (worker.checks.rootcause)."""

    staged: Mapping[int, int]
    causes: Any

    @classmethod
    def read(cls, session: Session, settings: Settings) -> Waits:
        from worker.digest.build import root_causes, staged_fixes

        return cls(staged_fixes(session, settings.practice), root_causes(session, settings))


def next_check(row: FindingRow, now: datetime, settings: Settings,
               waits: Waits | None = None) -> str:
    """What happens next to a finding, short enough for a table column."""
    state = row.state
    if waits is not None and state not in (S.RESOLVED, S.SILENCED, S.ESCALATED):
        run = waits.staged.get(row.id)
        if run is not None:
            return f"staff approval: oprecon fixes approve {run}"
        blocker = waits.causes.blocker_of(row) if waits.causes else None
        if blocker is not None:
            on = blocker.patient_id or blocker.contact_id or ""
            return f"after {blocker.check} {on} is fixed in OP".replace("  ", " ")
    if state == S.SILENCED:
        if row.silenced_until is None:
            return "silenced"
        return ("next scan" if now >= row.silenced_until
                else f"until {stamp(row.silenced_until)}")
    if state in (S.HELD, S.VERIFYING):
        if row.next_check_at is None:
            return "next scan"
        return "verify at next scan" if row.next_check_at <= now else (
            f"verify {relative(row.next_check_at, now)}")
    if state == S.PENDING:
        confirm = row.first_seen_at + settings.propagation_delay
        return "confirm at next scan" if confirm <= now else f"confirm {relative(confirm, now)}"
    if state == S.FIX_QUEUED:
        return "fix queued"
    if state == S.RESOLVED:
        return ""
    return "next scan"


def find_row(session: Session, practice: str, fingerprint: str) -> FindingRow:
    row = session.scalar(select(FindingRow).where(
        FindingRow.practice == practice, FindingRow.fingerprint == fingerprint))
    if row is None:
        raise OperationRefused(
            f"no finding with fingerprint {fingerprint} (see oprecon findings)")
    return row


def silence(
    session: Session, practice: str, fingerprint: str, until: datetime, reason: str | None,
    by: str, now: datetime,
) -> FindingRow:
    """Silence one finding until a time: digests skip it, the scans still track it. A
    change of an existing silence is an event too, so the history keeps both."""
    if until <= now:
        raise OperationRefused(f"--until {until.isoformat()} is not in the future")
    if not (reason or "").strip():
        raise OperationRefused("--reason is required: it is shown in digests and status")
    row = find_row(session, practice, fingerprint)
    if row.state == S.RESOLVED:
        raise OperationRefused(f"finding {fingerprint} is resolved: nothing to silence")
    if row.state in (S.FIX_QUEUED, S.HELD, S.VERIFYING):
        raise OperationRefused(f"finding {fingerprint} has a fix in progress ({row.state}): "
                               "silence it once the fix is verified")
    cause = f"silenced by {by} until {until.isoformat()}: {reason}"
    if row.state == S.SILENCED:
        session.add(FindingEvent(finding_id=row.id, at=now, from_state=S.SILENCED,
                                 to_state=S.SILENCED, cause=f"silence changed: {cause}"))
    else:
        from worker.scan.lifecycle import transition

        transition(session, row, S.SILENCED, now, cause, None)
    row.silenced_until = until
    row.silenced_by = by
    row.silence_reason = reason
    return row


def unsilence(session: Session, row: FindingRow, now: datetime, cause: str) -> bool:
    """End a silence now (the finding is open again); False when it was not silenced."""
    if row.state != S.SILENCED:
        return False
    from worker.scan.lifecycle import transition

    transition(session, row, S.OPEN, now, cause, None)
    row.silenced_until = None
    row.silenced_by = None
    row.silence_reason = None
    return True


def set_paused(session: Session, practice: str, paused: bool, reason: str,
               now: datetime) -> dict[str, Any]:
    """The pause switch every run reads before planning fixes (engine.FixGate). Returns
    the switch as it was. A second pause keeps when the pause began ("since"; the reason
    is the latest one); resuming what is not paused changes nothing."""
    prev = kv_get(session, practice, "paused") or {}
    was_paused = bool(prev.get("paused"))
    if not paused and not was_paused:
        return prev
    since = prev.get("at") if paused and was_paused else now.isoformat()
    kv_set(session, practice, "paused", {"paused": paused, "reason": reason, "at": since}, now)
    return prev


def paused_state(session: Session, practice: str) -> dict[str, Any]:
    return kv_get(session, practice, "paused") or {"paused": False}


# -- status --------------------------------------------------------------------------------


def _every(schedule: Any) -> str:
    if isinstance(schedule, timedelta):
        return "every " + fmt_seconds(schedule.total_seconds())
    text = repr(schedule)
    if text.startswith("<crontab: "):
        return "cron " + text.removeprefix("<crontab: ").split(" (", 1)[0]
    return text


def schedule(settings: Settings, client: Any, now: datetime) -> list[dict[str, Any]]:
    """The beat table and, from RedBeat's sorted set, when each entry is next due."""
    from config.schedule import beat_schedule, redbeat_key_prefix

    prefix = redbeat_key_prefix(settings)
    due: dict[str, float] = {}
    if client is not None:
        for member, score in client.zrange(f"{prefix}:schedule", 0, -1, withscores=True):
            name = member.decode() if isinstance(member, bytes) else str(member)
            due[name.removeprefix(prefix)] = float(score)
    entries = []
    for name, entry in beat_schedule(settings).items():
        at = datetime.fromtimestamp(due[name], tz=now.tzinfo) if name in due else None
        entries.append({
            "name": name, "task": entry["task"], "every": _every(entry["schedule"]),
            "next_due_at": iso(at),
            "due_in_seconds": round((at - now).total_seconds(), 1) if at else None,
        })
    return entries


def queue_depths(broker: Any) -> dict[str, int]:
    """Messages waiting on the broker per queue (LLEN, all priority lists)."""
    from config.schedule import QUEUES

    depths = {}
    for q in QUEUES:
        names = [q] + [f"{q}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS]
        depths[q] = sum(int(broker.llen(n)) for n in names)
    return depths


def run_json(run: Run, now: datetime, settings: Settings, client: Any = None
             ) -> dict[str, Any]:
    """One run for people and scripts; `client` (Redis) lets a running run whose scan
    lease expired show as lost at once (worker.runtime.lost)."""
    status = health.run_status(run, now, settings, client)
    end = run.finished_at or now
    return {
        "id": run.id, "kind": run.kind, "scope": run.scope, "status": status,
        "task_id": run.task_id, "started_at": iso(run.started_at),
        "duration_seconds": round((end - run.started_at).total_seconds(), 3),
        "records_read": run.records_read, "findings": run.findings_total,
        "findings_new": run.findings_new, "findings_resolved": run.findings_resolved,
        "fixes_queued": run.fixes_queued,
        "fixes_staged": int(((run.summary or {}).get("by_decision") or {}).get("staged", 0)),
        "alerts": run.alerts,
        "error": health.run_cause(run, status, settings),
        "part": (run.summary or {}).get("part"),
    }


def run_failures(runs: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    """Failed and lost runs since the last successful one, newest first: what on-call
    must see in status and health without reading worker logs."""
    out = []
    for r in runs:
        if r["status"] == "succeeded":
            break
        if r["status"] in ("failed", "lost"):
            at = health.parse_time(r["started_at"])
            out.append({"run_id": r["id"], "kind": r["kind"], "status": r["status"],
                        "part": r.get("part"), "cause": r["error"] or "no cause recorded",
                        "ago": fmt_seconds(health.age_seconds(at, now)) if at else "?"})
    return out


def collect_status(settings: Settings, now: datetime | None = None) -> dict[str, Any]:
    """Everything `oprecon status` shows, as one JSON-able dict; a part that cannot be read
    is reported under "errors" instead of failing."""
    import redis

    now = now or utcnow()
    errors: list[str] = []
    failures: list[str] = []
    status: dict[str, Any] = {
        "practice": settings.practice, "now": now.isoformat(),
        "config": {"broker": health.mask_url(settings.broker_url),
                   "redis": health.mask_url(settings.redis_url),
                   "state_db": health.mask_url(settings.state_db_url)},
    }
    lease_client: Any = health.redis_for_health(settings.redis_url)
    try:
        lease_client.ping()
    except redis.RedisError:
        lease_client.close()
        lease_client = None  # scan leases unknown: runs are judged by the hard limit only
    try:
        sessions = read_sessions(settings)
        with sessions() as session:
            runs = list(session.scalars(
                select(Run).where(Run.practice == settings.practice)
                .order_by(Run.started_at.desc(), Run.id.desc()).limit(RECENT_RUNS)))
            status["runs"] = [run_json(r, now, settings, lease_client) for r in runs]
            kv = {k: kv_get(session, settings.practice, k)
                  for k in ("paused", "breaker", "last_success", "deadman",
                            "full_scan_deferred")}
            held = session.scalars(select(FindingRow.next_check_at).where(
                FindingRow.practice == settings.practice, FindingRow.state == S.HELD)).all()
            by_state: dict[str, int] = {
                str(state): int(n) for state, n in session.execute(
                    select(FindingRow.state, func.count()).where(
                        FindingRow.practice == settings.practice,
                        FindingRow.state != S.RESOLVED,
                    ).group_by(FindingRow.state))
            }
        status["paused"] = kv["paused"] or {"paused": False}
        status["breaker"] = kv["breaker"] or {"state": "closed"}
        last = kv["last_success"]
        at = health.parse_time((last or {}).get("at"))
        status["last_success"] = (
            {**(last or {}), "age_seconds": round(health.age_seconds(at, now), 3)} if at
            else None)
        status["deadman"] = health.deadman_check(settings, last, kv["deadman"], now).to_json()
        # A nightly full scan that found the lock held and is owed (worker.runtime.deferral).
        status["full_scan_deferred"] = kv["full_scan_deferred"]
        upcoming = [t for t in held if t is not None and t > now]
        status["holds"] = {
            "held": len(held),
            "due": sum(1 for t in held if t is None or t <= now),
            "next_end_at": iso(min(upcoming)) if upcoming else None,
        }
        status["findings"] = {str(k): int(v) for k, v in sorted(by_state.items())}
        from worker.fixes.claims import fix_states
        from worker.fixes.staging import staged_batches

        with sessions() as session:
            status["staged"] = [{**b, "since": iso(b["since"])}
                                for b in staged_batches(session, settings.practice)]
            status["fixes"] = fix_states(session, settings.practice, now)
        status["failures"] = run_failures(status["runs"], now)
        failures = [f"run {f['run_id']} ({f['kind']}) {f['status']} {f['ago']} ago: "
                    f"{f['cause']}" for f in status["failures"]]
    except SQLAlchemyError as err:
        errors.append(f"state db: {type(err).__name__}")
    except OperationRefused as err:
        errors.append(f"state db: {err}")
    finally:
        if lease_client is not None:
            lease_client.close()

    client = health.redis_for_health(settings.redis_url)
    try:
        status["schedule"] = schedule(settings, client, now)
    except redis.RedisError as err:
        errors.append(f"redis: {type(err).__name__}")
        status["schedule"] = schedule(settings, None, now)
    finally:
        client.close()
    if settings.broker_url.startswith(("redis://", "rediss://")):
        broker = health.redis_for_health(settings.broker_url)
        try:
            status["queues"] = queue_depths(broker)
        except redis.RedisError as err:
            errors.append(f"broker: {type(err).__name__}")
        finally:
            broker.close()
    status["read_errors"] = errors
    # Parts that could not be read, then scans that failed since the last success.
    status["errors"] = errors + failures
    return status
