"""Failed and lost scans, with their cause, where on-call looks (status, health, --wait).

A scan can fail before the engine opens its run row: the sources cannot even be built
(a missing OP folder, a bad setting) or an incremental scan's first reads fail (the
portal is down). Without a row such a failure lives only in the worker's log, so the
runtime records one here: status `failed`, the cause in `error` ("part: Type: message"),
the part in `summary["part"]`. A failure the engine already recorded (it marks its own
row failed) is not recorded twice: the engine names that row on the exception.

Causes carry ids, paths and exception text (sources' errors name files, tables and
lines), scrubbed of anything that looks like an email, a phone number or a date.
"""

from __future__ import annotations

import contextlib
import re
from datetime import UTC, datetime

import structlog
from sqlalchemy.orm import Session, sessionmaker

from worker.model.text import scrub_text
from worker.state.models import Run

log = structlog.get_logger(__name__)

# Set by worker.scan.engine.reconcile on an exception after it marked its run failed.
RUN_ID_ATTR = "oprecon_run_id"
_PORTAL_TABLE = re.compile(r"\bportal_(users|links|sources|audit)\b")


def failure_part(err: BaseException) -> str:
    """Which part of the system failed, in the words `oprecon health` uses."""
    from redis.exceptions import RedisError
    from sqlalchemy.exc import SQLAlchemyError

    from config.settings import SettingsError
    from worker.sources.base import SourceError

    if isinstance(err, SettingsError):
        return "settings"
    if isinstance(err, RedisError):
        return "redis"
    if isinstance(err, SourceError):
        text = str(err)
        portal = (type(err).__name__.startswith("Portal") or text.startswith("portal")
                  or bool(_PORTAL_TABLE.search(text)))
        return "portal" if portal else "op source"
    if isinstance(err, SQLAlchemyError):
        return "state db"
    if type(err).__name__ in ("SoftTimeLimitExceeded", "TimeLimitExceeded"):
        return "time limit"
    return "scan"


def cause_text(err: BaseException) -> str:
    """One line: the part, the exception type and the first line of its message, with
    emails, phone numbers and dates masked (a parse error may quote a value)."""
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    first = scrub_text(first)
    text = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return f"{failure_part(err)}: {text}"[:500]


def mark_recorded(err: BaseException, run_id: int) -> None:
    """The engine marked run `run_id` failed because of `err`."""
    with contextlib.suppress(AttributeError, TypeError):  # a type without a __dict__
        setattr(err, RUN_ID_ATTR, run_id)


def record_failed_scan(
    sessions: sessionmaker[Session] | None, practice: str, kind: str, scope: str,
    task_id: str | None, err: BaseException, now: datetime | None = None,
) -> int | None:
    """Write the failed run row the engine could not (see the module docstring); returns
    its id, the engine's row id if it already recorded one, or None if the state database
    is itself what failed."""
    recorded = getattr(err, RUN_ID_ATTR, None)
    if recorded is not None:
        return int(recorded)
    now = now or datetime.now(UTC)
    if sessions is None:
        log.warning("failed_scan_not_recorded", kind=kind, part=failure_part(err))
        return None
    try:
        with sessions.begin() as session:
            run = Run(practice=practice, kind=kind, scope=scope, status="failed",
                      started_at=now, finished_at=now, task_id=task_id,
                      error=cause_text(err), summary={"part": failure_part(err)})
            session.add(run)
            session.flush()
            run_id = int(run.id)
    except Exception:  # noqa: BLE001 — the state database may be what failed
        log.warning("failed_scan_not_recorded", kind=kind, part=failure_part(err))
        return None
    mark_recorded(err, run_id)
    return run_id

