"""Lost runs: a scan whose worker died is marked `lost` within a minute, and its lock freed.

Killing the pool child is handled by Celery (the message is requeued at once) and by the
scan lock's take-over rule (worker.scan.locks). Killing the whole worker — SIGKILL, an
OOM kill of the container, a host that goes away — leaves the run `running`, the lock held
until it expires (scan hard limit + 60 s) and the message unacked until the broker's
visibility timeout. Nothing in the state database would ever say so.

So a scan run by a Celery task keeps a **lease** while it runs: a Redis key
`oprecon:<practice>:scan-alive:<task_id>` refreshed every heartbeat interval by a thread
of the process doing the scan, expiring after three intervals (30 s by default), like
the worker heartbeats (worker.runtime.health). Beside it, for scans that hold the
practice's scan lock, the lock's token is kept under the task id.

A running run whose lease has expired is dead. `reap` (called by the verify tick every
minute, by any live worker) marks it `lost` with the cause, and releases the scan lock if
the dead run still holds it, so the next scan runs at its next slot instead of 16 minutes
later. `status`, `health` and `reconcile --wait` show such a run as lost at once, before
the tick has written it (`lease_expired`). Runs without a task id (`--local`, tests) have
no lease and are judged by the hard time limit only.

A worker cut off from Redis but still running cannot refresh its lease: its run is then
reported lost although it may finish (its row then says succeeded). Its lock is freed, so
a second scan may start meanwhile; both write through the state database's transactions.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import redis
import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from worker.runtime.health import (
    alive_key,
    lease_expired,
    lost_cause,
    redis_for_health,
    stale_after,
    utcnow,
)
from worker.state.models import Run

log = structlog.get_logger(__name__)

# Delete the lock only if the dead run's token still holds it.
_RELEASE_IF = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


def owners_key(settings: Settings) -> str:
    return f"oprecon:{settings.practice}:scan-owners"


def lock_key(settings: Settings) -> str:
    return f"oprecon:{settings.practice}:scan"  # worker.scan.locks.scan_lock


@contextmanager
def lease(settings: Settings, task_id: str | None, *, holds_scan_lock: bool) -> Iterator[None]:
    """Keep this scan's lease alive for the block (module docstring). Never fails the
    scan: with Redis down the lease is simply not there, as for a dead run."""
    if not task_id:
        yield
        return
    client = redis_for_health(settings.redis_url)
    key = alive_key(settings, task_id)
    ttl = math.ceil(stale_after(settings))
    value = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
    stop = threading.Event()

    def refresh() -> None:
        failing = False
        while True:
            try:
                client.set(key, value, ex=ttl)
                failing = False
            except redis.RedisError as err:
                if not failing:
                    log.warning("scan_lease_not_refreshed", error=type(err).__name__)
                failing = True
            if stop.wait(settings.heartbeat_interval_seconds):
                return

    try:
        client.set(key, value, ex=ttl)
        if holds_scan_lock:
            token: Any = client.get(lock_key(settings))
            if token is not None:
                client.hset(owners_key(settings), task_id, token)
    except redis.RedisError as err:
        log.warning("scan_lease_not_started", error=type(err).__name__)
    thread = threading.Thread(target=refresh, name="oprecon-scan-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            client.delete(key)
            client.hdel(owners_key(settings), task_id)
        client.close()


def reap(
    settings: Settings, sessions: sessionmaker[Session], *, now: datetime | None = None,
    client: redis.Redis | None = None,
) -> list[int]:
    """Mark every dead running run `lost` and free the scan lock it still holds; returns
    their ids. Safe to run anywhere, any time, by several workers at once."""
    now = now or utcnow()
    own = client is None
    client = client or redis_for_health(settings.redis_url)
    reaped: list[int] = []
    try:
        with sessions.begin() as session:
            candidates = session.scalars(select(Run).where(
                Run.practice == settings.practice, Run.status == "running",
                Run.task_id.is_not(None),
            ).with_for_update(skip_locked=True))
            for run in candidates:
                if not lease_expired(run, now, settings, client):
                    continue
                run.status = "lost"
                run.finished_at = now
                run.error = lost_cause(settings)
                reaped.append(run.id)
                freed = _release_lock(settings, client, str(run.task_id))
                log.error("scan_lost", run_id=run.id, run_kind=run.kind,
                          lock_released=freed)
    except redis.RedisError as err:
        log.warning("lost_runs_not_checked", error=type(err).__name__)
        return []
    finally:
        if own:
            client.close()
    return reaped


def _release_lock(settings: Settings, client: redis.Redis, task_id: str) -> bool:
    token: Any = client.hget(owners_key(settings), task_id)
    client.hdel(owners_key(settings), task_id)
    if token is None:
        return False
    return bool(client.eval(_RELEASE_IF, 1, lock_key(settings), token))
