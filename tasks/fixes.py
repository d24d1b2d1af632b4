"""Fix tasks: one journaled portal change per task, on the `fix` queue."""

from __future__ import annotations

from typing import Any

from celery.utils.time import get_exponential_backoff_interval

from config.settings import get_settings
from worker.fixes.apply import TransientPortalError
from worker.runtime import service
from worker.runtime.celery_app import app

RETRY_BACKOFF = 5
RETRY_BACKOFF_MAX = 300  # far below the broker visibility timeout
MAX_RETRIES = 5
# Inside the claim's lease (settings.fix_time_limits): a live worker never outlasts it.
SOFT_LIMIT, HARD_LIMIT = get_settings().fix_time_limits


@app.task(
    name="oprecon.fix.apply",
    bind=True,
    max_retries=MAX_RETRIES,
    retry_backoff=RETRY_BACKOFF,
    retry_backoff_max=RETRY_BACKOFF_MAX,
    retry_jitter=True,
    soft_time_limit=SOFT_LIMIT,
    time_limit=HARD_LIMIT,
)
def apply_fix(self: Any, action_id: int) -> str:
    """The retry's countdown is chosen first, so the claim is kept for exactly that long
    (a retry keeps its claim; nobody else takes the fix meanwhile)."""
    countdown = get_exponential_backoff_interval(
        self.retry_backoff, self.request.retries, self.retry_backoff_max, self.retry_jitter)
    try:
        return service.apply_fix(get_settings(), int(action_id), owner=self.request.id,
                                 retry_in=countdown)
    except TransientPortalError as err:
        raise self.retry(exc=err, countdown=countdown) from err


def enqueue(ids: list[int]) -> None:
    """Send one message per fix, then stamp them as sent (the resume tick re-sends only
    what was never sent or whose claim lapsed)."""
    for action_id in ids:
        apply_fix.delay(action_id)
    service.fixes_enqueued(get_settings(), list(ids))


@app.task(name="oprecon.fix.resume", soft_time_limit=30, time_limit=40)
def resume_fixes() -> int:
    """Re-send fixes whose claim lapsed (a dead worker's) or that were never sent; the
    claim, not the portal's idempotency key, keeps a second delivery from calling."""
    ids = service.unfinished_fixes(get_settings())
    enqueue(ids)
    return len(ids)
