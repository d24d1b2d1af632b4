"""On-call runs through the worker: `oprecon reconcile --all|--patient|--contact [--wait]`.

The CLI sends `oprecon.scan.adhoc` by name with a task id it made up, then (with `--wait`)
follows that id in the state database: the `runs` row the engine writes, and before it
exists a small progress record, kv "adhoc:<task_id>", that the worker keeps:

    queued → waiting_for_lock (another scan holds the single-flight lock; the task waits
    up to 120 s for it) → started → done | failed | skipped (lock never came free)

The state database, not the Celery result backend (results are off, CELERY.md §1 row 7),
is the channel: it survives a worker restart and needs nothing but what `status` reads.

Exit codes: 0 done, 1 the run failed (or started and did not finish in time), 2 it could
not start (broker unreachable, lock never free, nothing picked it up in time).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Sequence
from typing import IO, Any

import structlog
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from worker.model.text import scrub_text
from worker.runtime.adhoc import TASK_NAME, BrokerUnreachable, Progress, poll, send
from worker.runtime.health import fmt_seconds, redis_for_health, run_cause
from worker.scan.engine import ScopeRequest, utcnow
from worker.scan.progress import ADHOC_LOCK_WAIT_SECONDS
from worker.state.models import FindingRow

__all__ = ["TASK_NAME", "BrokerUnreachable", "Progress", "poll", "send"]

log = structlog.get_logger(__name__)

TEXT_ROWS = 25


def _sessions(settings: Settings) -> sessionmaker[Session]:
    from worker.scan.wiring import state_sessions

    return state_sessions(settings, migrate_first=False)


def _line(out: IO[str], text: str) -> None:
    out.write(text + "\n")
    out.flush()


def _describe(p: Progress) -> str:
    if p.state == "queued":
        return "queued: waiting for a worker to pick it up"
    if p.state == "waiting":
        return "waiting for the scan lock held by another scan (up to " \
               f"{int((p.record or {}).get('wait_seconds', ADHOC_LOCK_WAIT_SECONDS))} s)"
    if p.state == "started":
        return "started: reading OP and the portal"
    if p.state == "running":
        return f"running (run {p.run.id if p.run else '?'})"
    return p.state


def _worker_alive(settings: Settings) -> bool | None:
    """Any fresh worker heartbeat for this practice? None when Redis cannot say."""
    import redis

    from worker.runtime.health import heartbeat_checks, read_heartbeats, redis_for_health

    client = redis_for_health(settings.redis_url)
    try:
        checks = heartbeat_checks(settings, read_heartbeats(client, settings), utcnow())
        return checks[0].ok
    except redis.RedisError:
        return None
    finally:
        client.close()


def _finding_json(row: FindingRow, actions: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "check": row.check, "severity": row.severity,
        "action": actions.get(row.fingerprint, "none"), "fingerprint": row.fingerprint,
        "patient_id": row.patient_id, "contact_id": row.contact_id,
        "portal_user_id": row.portal_user_id, "detail": row.detail,
    }
    if row.check == "contact_duplicate":
        out["contact_ids"] = list(row.contact_ids or [])
    return out


def _report(sessions: sessionmaker[Session], p: Progress, as_json: bool, out: IO[str]) -> None:
    assert p.run is not None
    run = p.run
    actions: dict[str, str] = (p.record or {}).get("actions") or {}
    fingerprints = (p.record or {}).get("fingerprints")
    which = (FindingRow.fingerprint.in_(fingerprints) if isinstance(fingerprints, list)
             else FindingRow.last_run_id == run.id)
    with sessions() as session:
        rows = list(session.scalars(
            select(FindingRow).where(FindingRow.practice == run.practice, which)
            .order_by(FindingRow.check, FindingRow.fingerprint)
        ))
    if as_json:
        for row in rows:
            out.write(json.dumps(_finding_json(row, actions)) + "\n")
        out.flush()
        return
    trace = (p.record or {}).get("trace") or []
    if trace:
        _line(out, f"Steps for {run.scope}:")
        for n, step in enumerate(trace, 1):
            _line(out, f"  {n:>2}. {step}")
        _line(out, "")
    seconds = (run.finished_at - run.started_at).total_seconds() if run.finished_at else 0.0
    _line(out, f"done: run {run.id} · {run.kind} {run.scope} · {run.records_read} records read"
               f" · {run.findings_total} finding(s) ({run.findings_new} new, "
               f"{run.findings_resolved} resolved) · {run.fixes_queued} fix(es) queued · "
               f"{run.alerts} alert(s) · {seconds:.2f}s")
    if not rows:
        return
    from worker.scan.report import table

    shown = rows[:TEXT_ROWS]
    cells = [(actions.get(r.fingerprint, "none"), r.check, r.severity, r.state, _ids(r))
             for r in shown]
    limit = detail_width(out, cells)
    _line(out, table(
        ["action", "check", "severity", "state", "ids", "detail"],
        [(*c, r.detail if limit is None else _cut(r.detail, limit))
         for c, r in zip(cells, shown, strict=True)],
    ))
    if len(rows) > len(shown):
        _line(out, f"… {len(rows) - len(shown)} more: oprecon findings")


def detail_width(out: IO[str], cells: Sequence[Sequence[str]]) -> int | None:
    """Room left for the detail column on this terminal (COLUMNS counts, as for any
    terminal program); None when the output is not a terminal and no width is set:
    a file or a pipe gets the whole text."""
    import os
    import shutil

    isatty = getattr(out, "isatty", lambda: False)()
    if not isatty and "COLUMNS" not in os.environ:
        return None
    columns = shutil.get_terminal_size().columns
    headers = ("action", "check", "severity", "state", "ids")
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    return max(20, columns - sum(widths) - 2 * len(widths))


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _ids(row: FindingRow) -> str:
    parts = [f"{k}={v}" for k, v in (("patient", row.patient_id), ("contact", row.contact_id),
                                     ("user", row.portal_user_id)) if v]
    if row.contact_ids:
        parts.append("contacts=" + ",".join(row.contact_ids))
    return " ".join(parts)


def default_timeout(settings: Settings) -> float:
    """Long enough for the lock wait plus the longest scan the hard limit allows."""
    return ADHOC_LOCK_WAIT_SECONDS + settings.scan_hard_limit_seconds + 30


def enqueue_and_wait(
    settings: Settings,
    request: ScopeRequest,
    wait: bool,
    as_json: bool,
    *,
    timeout: float | None = None,
    poll_seconds: float = 0.5,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """Queue an ad hoc scan on the worker; with `wait`, follow it to the end."""
    out = out or sys.stdout
    err = err or sys.stderr
    timeout = default_timeout(settings) if timeout is None else timeout
    task_id = str(uuid.uuid4())
    try:
        send(settings, request, task_id, expires=timeout if wait else None)
    except BrokerUnreachable as why:
        _line(err, f"oprecon: {why}")
        return 2
    if as_json and not wait:
        _line(out, json.dumps({"task_id": task_id, "state": "queued", "scope": request.label}))
        return 0
    talk = err if as_json else out  # with --json, stdout carries only findings
    _line(talk, f"queued ad hoc reconcile of {request.label} as task {task_id}")
    if not wait:
        return 0

    sessions = _sessions(settings)
    client = redis_for_health(settings.redis_url)
    try:
        return _follow(settings, sessions, client, task_id, timeout, poll_seconds, as_json,
                       out, err, talk)
    finally:
        client.close()


def _follow(settings: Settings, sessions: sessionmaker[Session], client: Any, task_id: str,
            timeout: float, poll_seconds: float, as_json: bool, out: IO[str], err: IO[str],
            talk: IO[str]) -> int:
    deadline = time.monotonic() + timeout
    queued_since = time.monotonic()
    said: str | None = None
    warned = False
    done_seen: float | None = None
    while True:
        try:
            p = poll(sessions, settings, task_id, client=client)
        except SQLAlchemyError:
            p = Progress("queued")  # the worker has not created the schema yet
        text = _describe(p)
        if p.state not in ("done", "failed", "lost", "skipped") and text != said:
            _line(talk, text)
            said = text
        if p.state == "queued" and not warned and time.monotonic() - queued_since > 3:
            warned = True
            if _worker_alive(settings) is False:
                _line(talk, f"no live worker for practice {settings.practice}: the task waits "
                            "in the queue until one runs (oprecon health)")
        if p.state == "done":
            # The summary record lands just after the run row; give it a moment.
            done_seen = done_seen or time.monotonic()
            if (p.record or {}).get("state") == "done" or time.monotonic() - done_seen > 2:
                _report(sessions, p, as_json, out)
                return 0
        elif p.state in ("failed", "lost"):
            # The cause is scrubbed of PHI where it is recorded (worker.scan.failures).
            run = f"run {p.run.id} " if p.run else ""
            if p.state == "lost":
                cause = run_cause(p.run, "lost", settings) if p.run else "lost"
                _line(err, f"oprecon: {run}lost: {cause}. The worker died mid-run: its scan "
                           "lock is freed within a minute by any live worker, and the broker gives "
                           "the message to a worker again after the visibility timeout ("
                           f"{fmt_seconds(settings.broker_visibility_timeout_seconds)}); "
                           "check oprecon health, then run this command again")
                return 1
            reason = ((run_cause(p.run, "failed", settings) if p.run else None)
                      or scrub_text(str((p.record or {}).get("error") or ""))
                      or "see the worker log")
            _line(err, f"oprecon: {run}failed: {reason} (the worker retries database, Redis "
                       "and source outages by itself: oprecon status shows the retry)")
            return 1
        elif p.state == "skipped":
            if p.run is not None and p.run.error:  # ids and lock names only
                _line(err, f"oprecon: could not start: {p.run.error} (try again)")
            else:
                _line(err, "oprecon: could not start: the scan lock was still held after "
                           f"{int((p.record or {}).get('wait_seconds', ADHOC_LOCK_WAIT_SECONDS))}"
                           " s (another scan is running; try again)")
            return 2
        if time.monotonic() >= deadline:
            started = p.state in ("started", "running", "done")
            _line(err, f"oprecon: timed out after {timeout:g}s while {text} (task {task_id})")
            return 1 if started else 2
        time.sleep(poll_seconds)
