"""Ad hoc run progress: what a worker writes so `reconcile --wait` can follow its run.

Before the engine's `runs` row exists, kv "adhoc:<task_id>" says where the request is:

    queued → waiting_for_lock (another scan holds the single-flight lock) → started →
    done | failed | skipped (lock never came free)

The CLI side that reads it is worker.cli.ondemand.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import delete
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from worker.scan import failures
from worker.scan.engine import RunResult, utcnow
from worker.scan.locks import ScanBusy, single_flight
from worker.state.db import kv_set
from worker.state.models import KeyValue

log = structlog.get_logger(__name__)

ADHOC_LOCK_WAIT_SECONDS = 120  # tasks/scans.py adhoc_scan's default
PROGRESS_PREFIX = "adhoc:"
PROGRESS_KEEP = timedelta(days=1)
TRACE_LINES = 400


def progress_key(task_id: str) -> str:
    return f"{PROGRESS_PREFIX}{task_id}"


def _sessions(settings: Settings) -> sessionmaker[Session]:
    from worker.scan.wiring import state_sessions

    return state_sessions(settings, migrate_first=False)



def record(settings: Settings, task_id: str | None, state: str, **data: Any) -> None:
    """Best effort: a progress record that cannot be written must not fail the scan."""
    if not task_id:
        return
    now = utcnow()
    try:
        with _sessions(settings).begin() as session:
            kv_set(session, settings.practice, progress_key(task_id),
                   {"state": state, "at": now.isoformat(), **data}, now)
    except SQLAlchemyError as err:
        log.warning("adhoc_progress_not_recorded", state=state, error=type(err).__name__)


def record_done(settings: Settings, task_id: str | None, result: RunResult) -> None:
    """The run's summary and each finding's planned action (only the ones that are not
    "none", to keep the record small), for `--wait --json`."""
    actions = {i.finding.fingerprint: a for i in result.plan.items
               if (a := i.decision.json_action) != "none"}
    # One patient's or contact's run: the guide's checklist (ids and flags only,
    # worker.scan.explain) and the steps, which `--wait` prints as `--local` does.
    trace = result.trace[:TRACE_LINES] if result.scope.kind in ("patient", "contact") else []
    extra: dict[str, Any] = {}
    if not result.scope.is_all:
        # A family's findings, for `--wait` to list: a later scan may have seen them
        # again (their last run is then that scan's) before the CLI reads them.
        extra["fingerprints"] = sorted(i.finding.fingerprint for i in result.plan.items)
    record(settings, task_id, "done", run_id=result.run_id, summary=result.summary(),
           actions=actions, trace=trace, **extra)


@contextmanager
def scan_lock(
    settings: Settings, *, wait_seconds: float = 0, task_id: str | None = None
) -> Iterator[None]:
    """`single_flight`, except that a run allowed to wait first says it is waiting (in kv
    "adhoc:<task_id>" when given a task id), so on-call sees why nothing happens yet.
    Raises ScanBusy when the lock stays held; a failure inside is recorded and re-raised."""
    with ExitStack() as stack:
        try:
            stack.enter_context(single_flight(settings, wait_seconds=0))
        except ScanBusy:
            if wait_seconds <= 0:
                raise
            log.info("scan_waiting_for_lock", wait_seconds=wait_seconds)
            record(settings, task_id, "waiting_for_lock", wait_seconds=wait_seconds)
            try:
                stack.enter_context(single_flight(settings, wait_seconds=wait_seconds))
            except ScanBusy:
                record(settings, task_id, "skipped", wait_seconds=wait_seconds)
                raise
        record(settings, task_id, "started")
        try:
            yield
        except Exception as err:
            record(settings, task_id, "failed", error=failures.cause_text(err))
            raise


def prune(session: Session, practice: str, now: datetime) -> int:
    """Drop progress records older than a day (the deadman task's housekeeping)."""
    res = session.execute(
        delete(KeyValue).where(
            KeyValue.practice == practice,
            KeyValue.key.like(f"{PROGRESS_PREFIX}%"),
            KeyValue.updated_at < now - PROGRESS_KEEP,
        )
    )
    return int(getattr(res, "rowcount", 0) or 0)
