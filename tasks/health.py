"""Health tasks: the dead-man's switch (scheduled in config/schedule.py)."""

from __future__ import annotations

from typing import Any

from config.settings import get_settings
from worker.runtime import deferral, health
from worker.runtime.celery_app import app
from worker.scan import progress
from worker.scan.engine import utcnow


@app.task(name="oprecon.health.deadman", soft_time_limit=30, time_limit=60)
def deadman() -> dict[str, Any]:
    """Record in kv "deadman" whether scans are overdue; staff notices read it from there.
    Also drops on-call progress records older than a day."""
    from worker.scan.wiring import state_sessions

    settings = get_settings()
    sessions = state_sessions(settings)
    now = utcnow()
    result = health.run_deadman(settings, sessions, now)
    # A deferred nightly full scan past its deadline is alerted on even when no scan
    # gets the lock to run it (worker.runtime.deferral).
    deferral.check_deadline(sessions, settings, now)
    with sessions.begin() as session:
        progress.prune(session, settings.practice, now)
    return result
