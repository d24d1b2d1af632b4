"""Fix tasks: one journaled portal change per task, on the `fix` queue."""

from __future__ import annotations

from typing import Any

from config.settings import get_settings
from worker.fixes.apply import TransientPortalError
from worker.runtime import service
from worker.runtime.celery_app import app


@app.task(
    name="oprecon.fix.apply",
    bind=True,
    autoretry_for=(TransientPortalError,),
    retry_backoff=5,
    retry_backoff_max=300,  # far below the broker visibility timeout
    retry_jitter=True,
    max_retries=5,
    soft_time_limit=120,
    time_limit=180,
)
def apply_fix(self: Any, action_id: int) -> str:
    return service.apply_fix(get_settings(), int(action_id))


@app.task(name="oprecon.fix.resume", soft_time_limit=60, time_limit=90)
def resume_fixes() -> int:
    """Re-enqueue intents a dead worker left behind; applying twice is prevented by the
    journal's state and the portal's idempotency key."""
    ids = service.unfinished_fixes(get_settings())
    for action_id in ids:
        apply_fix.delay(action_id)
    return len(ids)
