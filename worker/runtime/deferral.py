"""A nightly full scan that could not run is deferred, never dropped.

The full scan is the only scan that looks at duplicates across the whole practice,
deletions and hand-made portal link changes (worker.scan.incremental). Beat sends it
once a night; before this, a send that found the practice lock held was skipped and the
day went without one. Now a skipped full scan leaves kv "full_scan_deferred":

    {"since": first skip, "deadline": since + full_scan_deadline_hours,
     "attempts": skips so far, "reason": why the last one was skipped, "holder": ...}

and every scheduled incremental scan that gets the lock runs the full scan instead
(a full scan does all an incremental one does and sets the watermark), so it is retried
once a minute until it runs. Past the deadline — the night is over — staff are alerted
once (`alerted_at`: an immediate notice to the practice manager, worker.digest.build;
log `full_scan_missed`; a metric; `oprecon status`) and the retries go
on: a full scan late is better than none. A successful full scan clears the record.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from worker.state.db import kv_get, kv_set
from worker.state.models import KeyValue

log = structlog.get_logger(__name__)

KEY = "full_scan_deferred"


def deadline_for(settings: Settings, since: datetime) -> datetime:
    return since + timedelta(hours=settings.full_scan_deadline_hours)


def defer(
    sessions: sessionmaker[Session], settings: Settings, now: datetime, reason: str,
    holder: str | None,
) -> dict[str, Any]:
    """Record (or extend) the deferral of a skipped full scan; returns it."""
    with sessions.begin() as session:
        return defer_in(session, settings, now, reason, holder)


def defer_in(
    session: Session, settings: Settings, now: datetime, reason: str, holder: str | None,
) -> dict[str, Any]:
    """`defer` inside the caller's transaction (with the skipped run's row)."""
    value = kv_get(session, settings.practice, KEY) or {}
    since = value.get("since") or now.isoformat()
    value.update(
        since=since,
        deadline=value.get("deadline")
        or deadline_for(settings, datetime.fromisoformat(since)).isoformat(),
        attempts=int(value.get("attempts") or 0) + 1,
        reason=reason, holder=holder, last_attempt_at=now.isoformat(),
    )
    kv_set(session, settings.practice, KEY, value, now)
    log.warning("full_scan_deferred", attempts=value["attempts"], reason=reason,
                holder=holder, deadline=value["deadline"])
    return value


def pending(session: Session, practice: str) -> dict[str, Any] | None:
    return kv_get(session, practice, KEY)


def past_deadline(value: dict[str, Any], now: datetime) -> bool:
    deadline = value.get("deadline")
    return bool(deadline) and now > datetime.fromisoformat(str(deadline))


def check_deadline(
    sessions: sessionmaker[Session], settings: Settings, now: datetime
) -> dict[str, Any] | None:
    """Alert once when a deferred full scan is past its deadline; returns the deferral
    (None when no full scan is owed). Called by every incremental scan and the dead-man's
    switch tick, so the alert comes even when no scan gets the lock."""
    with sessions.begin() as session:
        value = kv_get(session, settings.practice, KEY)
        if value is None or not past_deadline(value, now) or value.get("alerted_at"):
            return value
        value["alerted_at"] = now.isoformat()
        kv_set(session, settings.practice, KEY, value, now)
    from worker.runtime import metrics

    metrics.full_scan_missed()
    log.error("full_scan_missed", since=value["since"], deadline=value["deadline"],
              attempts=value.get("attempts"), reason=value.get("reason"),
              holder=value.get("holder"))
    return value


def clear(sessions: sessionmaker[Session], settings: Settings) -> None:
    """A full scan succeeded: nothing is owed any more."""
    with sessions.begin() as session:
        session.execute(delete(KeyValue).where(KeyValue.practice == settings.practice,
                                               KeyValue.key == KEY))
