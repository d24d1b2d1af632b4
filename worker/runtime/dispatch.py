"""Queue work by task name, so code under worker/ never imports tasks/ (no cycle).

The names are the Celery task names in tasks/ (a stable contract). Messages are sent only
after the rows they point at are committed (the callers commit first).
"""

from __future__ import annotations

from celery import group

from config.settings import Settings
from worker.runtime.celery_app import app

FIX_TASK = "oprecon.fix.apply"
SHARD_TASK = "oprecon.scan.shard"


def send_fixes(settings: Settings, ids: list[int]) -> None:
    """Queue the fixes on the `fix` queue of `settings.broker_url`; raises when the
    broker does not answer (one quick retry)."""
    with app.connection_for_write(settings.broker_url) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=3)
        for action_id in ids:
            app.send_task(FIX_TASK, args=(action_id,), connection=conn, queue="fix",
                          retry=False)
    from worker.fixes.claims import mark_enqueued
    from worker.scan.engine import utcnow
    from worker.scan.wiring import state_sessions

    mark_enqueued(state_sessions(settings), ids, utcnow())


def enqueue_shards(parent_id: int, count: int) -> None:
    """A group, never a chord (CELERY.md §1 row 8): the shards combine in the state DB."""
    group(app.signature(SHARD_TASK, args=(parent_id, i, count)) for i in range(count)
          ).apply_async()
