"""Digest tasks: find what is due, and send one digest per recipient.

The tick passes keys only (recipient key, window key), never objects: the deliver task
rebuilds the digest from the state database when it runs (sentry's digest pattern).
Exactly-once bookkeeping lives in worker.digest.send, not here.
"""

from __future__ import annotations

from typing import Any

from config.settings import get_settings
from worker.digest import send
from worker.runtime.celery_app import app
from worker.scan.wiring import state_sessions

MAX_RETRIES = 5


@app.task(name="oprecon.digest.tick", soft_time_limit=60, time_limit=90)
def tick() -> int:
    """Enqueue a delivery per recipient and due daily window, and one per recipient for
    its unsent immediate notices (the delivery bundles them into one message).

    Enqueuing the same pair twice (a slow queue, two ticks) is harmless: the row's
    unique constraint lets only one delivery send.
    """
    settings = get_settings()
    pairs = send.tick(settings, state_sessions(settings))
    for recipient_key, window_key in pairs:
        deliver.delay(recipient_key, window_key)
    return len(pairs)


@app.task(
    name="oprecon.digest.deliver",
    bind=True,
    autoretry_for=(send.TransientDeliveryError,),
    retry_backoff=30,
    retry_backoff_max=600,  # 30+60+120+240+480 s in all: far below the visibility timeout
    retry_jitter=True,
    max_retries=MAX_RETRIES,
    soft_time_limit=120,
    time_limit=180,
)
def deliver(self: Any, recipient_key: str, window_key: str) -> str:
    settings = get_settings()
    final = self.request.retries >= MAX_RETRIES
    result = send.deliver(settings, state_sessions(settings), str(recipient_key),
                          str(window_key), final=final)
    return result.status
