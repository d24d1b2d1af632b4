"""On-call commands over the state database: findings, silence, pause, status, health.

Reads never migrate or create anything (a missing SQLite file is a one-line error);
writes (silence, pause) bring the schema up to date first. Output names ids only, and
connection URLs are printed with their passwords masked.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from datetime import datetime
from typing import IO, Any

from sqlalchemy import case, func, select

from config.settings import Settings
from worker.cli.errors import CannotStart
from worker.runtime import health
from worker.runtime import operations as ops
from worker.runtime.health import fmt_seconds
from worker.runtime.operations import (
    Waits,
    collect_status,
    effective_state,
    next_check,
    queue_depths,
    read_sessions,
    relative,
    write_sessions,
)
from worker.runtime.operations import iso as _iso
from worker.runtime.operations import stamp as _stamp
from worker.scan.engine import utcnow
from worker.state.models import FindingRow
from worker.state.models import FindingState as S

SEVERITY_ORDER = {"high": 0, "warning": 1, "info": 2}
__all__ = ["collect_status", "effective_state", "next_check", "queue_depths", "read_sessions",
           "relative", "write_sessions"]


def _cannot(message: str) -> CannotStart:
    return CannotStart(message)


def _out(out: IO[str] | None) -> IO[str]:
    return out or sys.stdout


def _print(out: IO[str], text: str = "") -> None:
    out.write(text + "\n")


def fmt_duration(seconds: float) -> str:
    """Run durations: sub-second precision while it matters."""
    return f"{seconds:.2f}s" if seconds < 10 else fmt_seconds(seconds)


# -- findings ------------------------------------------------------------------------------


def ids_text(row: FindingRow) -> str:
    parts = [f"{k}={v}" for k, v in (("patient", row.patient_id), ("contact", row.contact_id),
                                     ("user", row.portal_user_id)) if v]
    if row.contact_ids:
        parts.append("contacts=" + ",".join(str(c) for c in row.contact_ids))
    return " ".join(parts)


def next_check_at(row: FindingRow, settings: Settings | None) -> datetime | None:
    """When the finding is looked at again, as the table's "next check" says: a pending
    finding is confirmed one propagation delay after it was first seen."""
    if row.next_check_at is None and row.state == S.PENDING and settings is not None:
        return row.first_seen_at + settings.propagation_delay
    return row.next_check_at


def finding_json(row: FindingRow, now: datetime,
                 settings: Settings | None = None) -> dict[str, Any]:
    return {
        "fingerprint": row.fingerprint, "check": row.check, "severity": row.severity,
        "state": row.state, "effective_state": effective_state(row, now),
        "patient_id": row.patient_id, "contact_id": row.contact_id,
        "portal_user_id": row.portal_user_id, "contact_ids": row.contact_ids,
        "detail": row.detail, "first_seen_at": _iso(row.first_seen_at),
        "last_seen_at": _iso(row.last_seen_at), "state_changed_at": _iso(row.state_changed_at),
        "age_seconds": round((now - row.first_seen_at).total_seconds(), 3),
        "next_check_at": _iso(next_check_at(row, settings)), "fix_attempts": row.fix_attempts,
        "silenced_until": _iso(row.silenced_until), "silenced_by": row.silenced_by,
        "silence_reason": row.silence_reason,
    }


def list_findings(
    settings: Settings,
    check: str | None,
    state: str | None,
    as_json: bool,
    limit: int,
    *,
    patient: str | None = None,
    contact: str | None = None,
    as_csv: bool = False,
    now: datetime | None = None,
    out: IO[str] | None = None,
) -> None:
    """Unresolved findings by default, most severe and oldest first; `--state all` or
    `--state resolved` to see the rest; `--patient`/`--contact` narrow them to findings
    naming that id (a duplicate group counts for each of its contacts)."""
    from worker.checks.catalog import CHECK_IDS
    from worker.cli import audit
    from worker.scan.report import table

    out = _out(out)
    now = now or utcnow()
    if patient and contact:
        raise _cannot("choose one of --patient ID, --contact ID")
    if as_json and as_csv:
        raise _cannot("choose one of --json, --csv")
    if check is not None and check not in CHECK_IDS:
        raise _cannot(f"--check: unknown check id {check!r}")
    states = [str(s) for s in S]
    if state is not None and state != "all" and state not in states:
        raise _cannot(f"--state: one of {', '.join(states)}, all")
    if limit < 1:
        raise _cannot("--limit must be at least 1")
    where = [FindingRow.practice == settings.practice]
    if check:
        where.append(FindingRow.check == check)
    if state is None:
        where.append(FindingRow.state != S.RESOLVED)
    elif state != "all":
        where.append(FindingRow.state == state)
    rank = case(SEVERITY_ORDER, value=FindingRow.severity, else_=9)
    target = patient or contact
    with read_sessions(settings)() as session:
        waits = Waits.read(session, settings)
        if target is None:
            total = session.scalar(
                select(func.count()).select_from(FindingRow).where(*where)) or 0
            rows = list(session.scalars(
                select(FindingRow).where(*where)
                .order_by(rank, FindingRow.first_seen_at, FindingRow.id).limit(limit)
            ))
        else:
            if patient:
                where.append(FindingRow.patient_id == patient)
            else:
                where.append(audit.involves([target]))
            found = [r for r in session.scalars(
                select(FindingRow).where(*where)
                .order_by(rank, FindingRow.first_seen_at, FindingRow.id))
                if patient or audit.row_involves(r, {target})]
            total, rows = len(found), found[:limit]
    if as_csv:
        audit.write_csv((finding_json(r, now, settings) for r in rows), out)
        return
    if as_json:
        for row in rows:
            _print(out, json.dumps(finding_json(row, now, settings)))
        return
    if rows:
        _print(out, table(
            ["fingerprint", "check", "severity", "state", "ids", "age", "next check"],
            [(r.fingerprint, r.check, r.severity, effective_state(r, now), ids_text(r),
              fmt_seconds((now - r.first_seen_at).total_seconds()),
              next_check(r, now, settings, waits))
             for r in rows],
        ))
    what = "finding(s)" if state in (None, "all") else f"{state} finding(s)"
    scope = "" if state is not None else " unresolved"
    shown = f"{len(rows)} of {total}" if total > len(rows) else f"{total}"
    about = f" about {'patient' if patient else 'contact'} {target}" if target else ""
    _print(out, f"{shown}{scope} {what}" + (f" for {check}" if check else "") + about)


# -- staged fix batches --------------------------------------------------------------------


def list_staged(
    settings: Settings, as_json: bool, *, now: datetime | None = None,
    out: IO[str] | None = None,
) -> None:
    """The batches the mass-change guard holds, so staff know which RUN to look at."""
    from worker.fixes.staging import staged_batches
    from worker.scan.report import table

    out = _out(out)
    now = now or utcnow()
    with read_sessions(settings)() as session:
        batches = staged_batches(session, settings.practice)
    if as_json:
        for b in batches:
            _print(out, json.dumps({**b, "since": _iso(b["since"])}))
        return
    if not batches:
        _print(out, "no staged fixes: nothing waits for approval")
        return
    _print(out, table(
        ["run", "staged", "fixes", "waiting", "why"],
        [(b["run_id"], b["staged"], ", ".join(f"{k} {n}" for k, n in sorted(b["kinds"].items())),
          relative(b["since"], now), b["reason"] or "")
         for b in batches],
    ))
    _print(out, "look: oprecon fixes show RUN · release: oprecon fixes approve RUN · "
                "drop: oprecon fixes reject RUN")


def show_staged(
    settings: Settings, run_id: int, as_json: bool, *, out: IO[str] | None = None,
) -> None:
    """Each staged fix of one run and the finding it is for (ids only)."""
    from worker.fixes.staging import staged_fixes
    from worker.scan.report import table

    out = _out(out)
    with read_sessions(settings)() as session:
        fixes = staged_fixes(session, settings.practice, run_id)
    if not fixes:
        raise _cannot(f"run {run_id} has no staged fixes (oprecon fixes list shows those "
                      "that do)")
    if as_json:
        for fix in fixes:
            _print(out, json.dumps(fix))
        return
    ids = (("patient", "patient_id"), ("contact", "contact_id"), ("user", "portal_user_id"))
    _print(out, table(
        ["action", "fix", "check", "ids", "finding", "fingerprint"],
        [(f["action_id"], f["kind"], f["check"],
          " ".join(f"{label}={f[key]}" for label, key in ids if f[key]),
          f["finding_state"], f["fingerprint"]) for f in fixes],
    ))
    _print(out, f"{len(fixes)} staged fix(es) in run {run_id}: oprecon fixes approve {run_id} "
                f"queues them, oprecon fixes reject {run_id} drops them")


# -- silence, pause ------------------------------------------------------------------------


def set_silence(
    settings: Settings,
    fingerprint: str,
    until: datetime | None,
    reason: str | None,
    by: str | None,
    *,
    now: datetime | None = None,
    out: IO[str] | None = None,
) -> None:
    """Silence one finding until a time (digests skip it, the scans still track it), or
    with `until=None` end the silence now. Every change is a FindingEvent."""
    out = _out(out)
    now = now or utcnow()
    with write_sessions(settings).begin() as session:
        if until is None:
            row = ops.find_row(session, settings.practice, fingerprint)
            if ops.unsilence(session, row, now, "unsilenced from the CLI"):
                _print(out, f"unsilenced {row.fingerprint} ({row.check}): open again")
            else:
                _print(out, f"{row.fingerprint} is not silenced (state {row.state}): "
                            "nothing to do")
            return
        row = ops.silence(session, settings.practice, fingerprint, until, reason,
                          by or "on-call", now)
    _print(out, f"silenced {fingerprint} ({row.check}) until {_stamp(until)}")


def set_paused(
    settings: Settings, paused: bool, reason: str, *, now: datetime | None = None,
    out: IO[str] | None = None,
) -> None:
    """The pause switch every run reads before planning fixes (engine.FixGate)."""
    import structlog

    out = _out(out)
    now = now or utcnow()
    with write_sessions(settings).begin() as session:
        prev = ops.set_paused(session, settings.practice, paused, reason, now)
    was_paused = bool(prev.get("paused"))
    since = prev.get("at")
    if not paused and not was_paused:
        _print(out, "fixes were not paused: nothing to resume")
        return
    structlog.get_logger(__name__).info("fixes_paused" if paused else "fixes_resumed")
    if paused and was_paused:
        _print(out, f"fixes were already paused (since {since}); reason now: {reason}")
    elif paused:
        _print(out, f"fixes paused: {reason} (detection and digests go on; "
                    "oprecon resume restarts fixes)")
    else:
        _print(out, f"fixes resumed (paused since {prev.get('at', '?')})")


# -- status --------------------------------------------------------------------------------


def _failure_lines(failures: list[dict[str, Any]]) -> Iterable[str]:
    """One line per cause: a retried outage fails several runs the same way."""
    by_cause: dict[tuple[str, str], list[int]] = {}
    for f in failures:
        by_cause.setdefault((f["status"], f["cause"]), []).append(f["run_id"])
    for (status, cause), ids in by_cause.items():
        runs = f"run {ids[0]}" if len(ids) == 1 else "runs " + ", ".join(map(str, ids))
        yield f"{runs} {status}: {cause}"


def _fixes_cell(run: dict[str, Any]) -> str:
    """Queued fixes, and those the mass-change guard staged instead (not "0")."""
    staged = run.get("fixes_staged") or 0
    if not staged:
        return str(run["fixes_queued"])
    return f"{run['fixes_queued']} +{staged} staged"


def _lines_status(st: dict[str, Any], now: datetime) -> Iterable[str]:
    from worker.scan.report import table

    yield f"oprecon status · practice {st['practice']} · {_stamp(now)}"
    cfg = st["config"]
    yield f"broker     {cfg['broker']}"
    yield f"redis      {cfg['redis']}"
    yield f"state db   {cfg['state_db']}"
    if "paused" in st:
        p = st["paused"]
        pause = (f"PAUSED since {p.get('at', '?')}: {p.get('reason', '')}" if p.get("paused")
                 else "running (not paused)")
        b = st["breaker"]
        yield f"fixes      {pause} · portal breaker {b.get('state', 'closed')}"
        for batch in st.get("staged") or []:
            since = health.parse_time(batch["since"])
            yield (f"staged     run {batch['run_id']}: {batch['staged']} fix(es) held by the "
                   f"mass-change guard, waiting {relative(since, now).removesuffix(' ago')} · "
                   f"look: oprecon fixes show {batch['run_id']} · then oprecon fixes approve|"
                   f"reject {batch['run_id']}")
        last = st["last_success"]
        dm = st["deadman"]
        if last and dm.get("demo"):
            yield (f"last scan  demo run {last.get('run_id')} succeeded "
                   f"{fmt_seconds(last['age_seconds'])} ago · dead-man's switch not armed "
                   "(only oprecon demo has scanned this database; a worker's scans arm it)")
        elif last:
            yield (f"last scan  {last.get('kind', 'scan')} run {last.get('run_id')} succeeded "
                   f"{fmt_seconds(last['age_seconds'])} ago · dead-man's switch "
                   f"{'ok' if dm['ok'] else 'OVERDUE'} (limit {fmt_seconds(dm['limit_seconds'])})")
        else:
            yield f"last scan  no successful scan recorded yet · {dm['detail']}"
        fails = st.get("failures") or []
        if fails:
            f = fails[0]
            yield (f"failing    run {f['run_id']} ({f['kind']}) {f['status']} {f['ago']} ago: "
                   f"{f['cause']}" + (f" (+{len(fails) - 1} more since the last success)"
                                      if len(fails) > 1 else ""))
        owed = st.get("full_scan_deferred")
        if owed:
            late = " · MISSED its deadline, alerted" if owed.get("alerted_at") else ""
            yield (f"full scan  deferred since {owed.get('since')} ({owed.get('attempts')} "
                   f"skip(s): {owed.get('reason')}); deadline {owed.get('deadline')}{late}")
        h = st["holds"]
        nxt = health.parse_time(h["next_end_at"])
        yield (f"holds      {h['held']} held, {h['due']} due for verification"
               + (f", next ends {relative(nxt, now)}" if nxt else ""))
        counts = " · ".join(f"{k} {v}" for k, v in st["findings"].items()) or "none"
        yield f"findings   {counts} (unresolved, by state)"
    if "fixes" in st:
        yield "fix states " + " · ".join(_fix_state(k, v) for k, v in st["fixes"].items())
    if "queues" in st:
        q = st["queues"]
        yield "queues     " + " · ".join(f"{k} {v}" for k, v in q.items()) + " (waiting)"
    if st.get("runs") is not None:
        yield ""
        yield "Last runs"
        if st["runs"]:
            yield table(
                ["id", "kind", "scope", "status", "started", "duration", "records", "new",
                 "resolved", "fixes", "alerts"],
                [(r["id"], r["kind"], r["scope"], r["status"],
                  _stamp(health.parse_time(r["started_at"])), fmt_duration(r["duration_seconds"]),
                  r["records_read"], r["findings_new"], r["findings_resolved"],
                  _fixes_cell(r), r["alerts"]) for r in st["runs"]],
            )
            yield from _failure_lines(st.get("failures") or [])
        else:
            yield "(no runs yet)"
    yield ""
    yield "Schedule (next due from RedBeat)"
    yield table(
        ["entry", "task", "schedule", "next due"],
        [(e["name"], e["task"], e["every"],
          relative(health.parse_time(e["next_due_at"]), now) if e["next_due_at"]
          else "not scheduled yet (no beat has run)") for e in st["schedule"]],
    )
    for err in st.get("read_errors", st["errors"]):
        yield f"could not read {err}"


def _fix_state(name: str, entry: dict[str, Any]) -> str:
    age = entry.get("oldest_age_seconds")
    oldest = f" (oldest {fmt_seconds(age)})" if entry["count"] and age is not None else ""
    return f"{name} {entry['count']}{oldest}"


def show_status(
    settings: Settings, as_json: bool, *, now: datetime | None = None, out: IO[str] | None = None
) -> None:
    out = _out(out)
    now = now or utcnow()
    st = collect_status(settings, now)
    if as_json:
        _print(out, json.dumps(st))
        return
    for line in _lines_status(st, now):
        _print(out, line)


# -- health --------------------------------------------------------------------------------


def show_health(
    settings: Settings, as_json: bool, process: str | None = None, *,
    now: datetime | None = None, out: IO[str] | None = None,
) -> int:
    """0 healthy, 1 not. With `process`, only this container's heartbeat file (docker
    healthcheck); without, the whole practice: Redis, broker, state DB, worker and beat
    heartbeats, and the dead-man's switch."""
    out = _out(out)
    now = now or utcnow()
    if process is not None:
        if process not in health.PROCESSES:
            raise _cannot(f"--process: one of {', '.join(health.PROCESSES)}")
        checks = [health.process_check(settings, process, now)]
    else:
        checks = health.cluster_checks(settings, now)
    healthy = all(c.ok for c in checks)
    if as_json:
        _print(out, json.dumps({"healthy": healthy, "practice": settings.practice,
                                "now": now.isoformat(), "checks": [c.to_json() for c in checks]}))
        return 0 if healthy else 1
    if process is None:
        _print(out, f"oprecon health · practice {settings.practice} · {_stamp(now)}")
    width = max(len(c.name) for c in checks)
    for c in checks:
        _print(out, f"  {'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")
    failed = [c.name for c in checks if not c.ok]
    _print(out, "healthy" if healthy else "unhealthy: " + ", ".join(failed))
    return 0 if healthy else 1
