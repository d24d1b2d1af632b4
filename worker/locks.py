"""Single-flight: one scan of a practice at a time, across every worker and on-call.

A redis-py lock whose expiry outlives the scan's hard time limit, so a killed worker
cannot leave it stuck for longer than that (CELERY.md §1 row 2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.lock import Lock

from config.settings import Settings


class ScanBusy(RuntimeError):
    """Another scan of this practice holds the lock."""


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
    )


def scan_lock(settings: Settings, client: redis.Redis | None = None) -> Lock:
    client = client or redis_client(settings)
    return client.lock(
        f"oprecon:{settings.practice}:scan",
        timeout=settings.lock_timeout_seconds,
        thread_local=False,
    )


@contextmanager
def single_flight(
    settings: Settings, *, wait_seconds: float = 0, client: redis.Redis | None = None
) -> Iterator[Lock]:
    """Hold the scan lock for the block, or raise ScanBusy (after waiting, if asked to)."""
    lock = scan_lock(settings, client)
    got = lock.acquire(blocking=wait_seconds > 0, blocking_timeout=wait_seconds or None)
    if not got:
        raise ScanBusy(f"another scan of practice {settings.practice} is running")
    try:
        yield lock
    finally:
        # It may have expired while we ran: the next scan may already own it.
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()
