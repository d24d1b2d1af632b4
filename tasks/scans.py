"""Scan tasks: full, incremental, ad hoc, and the tick that verifies ended holds."""

from __future__ import annotations

import threading
from typing import Any

from celery import signals
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import OperationalError

from config.settings import get_settings
from worker.runtime import service
from worker.runtime.celery_app import app
from worker.scan.engine import ScopeRequest
from worker.sources.base import SourceUnavailable

# A database, Redis or a source that is down now may be back in a minute: retry with
# backoff (capped far below the broker's visibility timeout); the failed attempt is
# recorded as a failed run, never as a success.
RETRY = dict(
    autoretry_for=(OperationalError, RedisConnectionError, SourceUnavailable),
    retry_backoff=15,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=4,
)


def _after(outcome: service.ScanOutcome) -> dict[str, Any]:
    """Fixes are enqueued only after the run's intents are committed (engine.reconcile)."""
    from tasks.fixes import enqueue

    enqueue(outcome.action_ids)
    summary = outcome.result.summary() if outcome.result else {}
    return {"status": outcome.status, "reason": outcome.reason, **summary}


@app.task(name="oprecon.scan.full", bind=True, **RETRY)
def full_scan(self: Any) -> dict[str, Any]:
    return _after(service.scan(get_settings(), "full", task_id=self.request.id))


@app.task(name="oprecon.scan.shard", bind=True, **RETRY)
def shard_scan(self: Any, parent_id: int, index: int, count: int) -> dict[str, Any]:
    """One shard of a sharded full scan (worker.scan.shards): keys only, never objects."""
    return _after(service.scan_shard(get_settings(), parent_id, index, count,
                                     task_id=self.request.id))


@app.task(name="oprecon.scan.incremental", bind=True, **RETRY)
def incremental_scan(self: Any) -> dict[str, Any]:
    return _after(service.scan(get_settings(), "incremental", task_id=self.request.id))


@app.task(name="oprecon.scan.adhoc", bind=True, **RETRY)
def adhoc_scan(self: Any, kind: str = "all", target: str | None = None,
               wait_seconds: float = 120) -> dict[str, Any]:
    request = ScopeRequest(kind, target)
    return _after(
        service.scan(get_settings(), "adhoc", request, task_id=self.request.id,
                     wait_seconds=wait_seconds)
    )


@app.task(name="oprecon.verify.tick", bind=True)
def verify_tick(self: Any) -> dict[str, Any]:
    return _after(service.verify_due(get_settings(), task_id=self.request.id))


@signals.worker_process_init.connect
def _warm_pool_child(**_: Any) -> None:
    """Build this pool child's sources and state connection in the background, so the
    first on-call run it takes does not pay for them (issue 18: ~5 s on a loaded host);
    off the init path, so a slow start cannot trip the pool's process-init timeout."""
    threading.Thread(target=service.warm_up, args=(get_settings(),), name="warm-up",
                     daemon=True).start()


# Scheduled scans whose `expires` can pass while they wait in the queue.
EXPIRING = {"oprecon.scan.incremental": "incremental", "oprecon.scan.full": "full",
            "oprecon.verify.tick": "verify"}


@signals.task_revoked.connect
def _expired_scan(sender: Any = None, request: Any = None, expired: bool = False,
                  **_: Any) -> None:
    """Celery drops an expired message without running it, and used to leave no trace:
    record it as a skipped run (worker.runtime.service.record_expired). `sender` is the
    task, `request` its context."""
    kind = EXPIRING.get(getattr(sender, "name", "") or "")
    if expired and kind is not None:
        service.record_expired(get_settings(), kind, getattr(request, "id", None))
