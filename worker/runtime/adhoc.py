"""Ad hoc runs on the worker, sent by name and followed in the state database.

The CLI (`oprecon reconcile --wait`) and the web console both send `oprecon.scan.adhoc`
with a task id they made up, then follow that id: the `runs` row the engine writes, and
before it exists the progress record kv "adhoc:<task_id>" the worker keeps
(worker.scan.progress). The state database, not the Celery result backend, is the channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from worker.scan.engine import ScopeRequest, utcnow
from worker.scan.progress import progress_key
from worker.state.db import kv_get
from worker.state.models import Run

TASK_NAME = "oprecon.scan.adhoc"


class BrokerUnreachable(RuntimeError):
    pass


def send(settings: Settings, request: ScopeRequest, task_id: str,
         expires: float | None = None) -> None:
    """Queue the ad hoc scan by name, failing fast (one retry) when the broker is down."""
    from kombu.exceptions import KombuError, OperationalError

    from worker.runtime.celery_app import make_celery_app

    app = make_celery_app(settings)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5,
                                   timeout=5)
            app.send_task(
                TASK_NAME,
                kwargs={"kind": request.kind, "target": request.target},
                task_id=task_id,
                connection=conn,
                expires=expires,
                retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5},
            )
    except (OperationalError, KombuError, OSError) as err:
        from worker.runtime.health import mask_url

        raise BrokerUnreachable(
            f"could not queue the scan: broker unreachable ({mask_url(settings.broker_url)})"
        ) from err


@dataclass
class Progress:
    state: str  # queued | waiting | started | running | done | failed | skipped | lost
    run: Run | None = None
    record: dict[str, Any] | None = None


def poll(sessions: sessionmaker[Session], settings: Settings, task_id: str,
         now: datetime | None = None, client: Any = None) -> Progress:
    """Where the run is; `client` (Redis) lets it see that a running run's worker died
    (its lease expired, worker.runtime.lost) without waiting for the hard time limit."""
    now = now or utcnow()
    with sessions() as session:
        run = session.scalar(
            select(Run).where(Run.practice == settings.practice, Run.task_id == task_id)
            .order_by(Run.id.desc()).limit(1)
        )
        rec = kv_get(session, settings.practice, progress_key(task_id))
    state = (rec or {}).get("state")
    if run is not None:
        if run.status == "succeeded":
            return Progress("done", run, rec)
        if run.status == "failed":
            return Progress("failed", run, rec)
        if run.status == "skipped":
            return Progress("skipped", run, rec)
        from worker.runtime.health import run_status

        if run_status(run, now, settings, client) == "lost":
            return Progress("lost", run, rec)  # its worker died, or killed at the hard limit
        return Progress("running", run, rec)
    if state == "waiting_for_lock":
        return Progress("waiting", None, rec)
    if state in ("started", "done"):
        return Progress("started", None, rec)
    if state in ("failed", "skipped"):
        return Progress(state, None, rec)
    return Progress("queued", None, rec)
