"""The Celery application: the only module in worker/ that imports Celery.

Settings follow CELERY.md: JSON only, late acks with requeue on a lost worker (every
task is idempotent), prefetch 1, no results stored (outcomes live in SQL), our own
logging instead of Celery's, one queue per concern, RedBeat so two beats cannot
double the schedule, and every time limit below the broker's visibility timeout
(the numbers: docs/operations.md, "Time limits").

Liveness without `celery inspect ping` (worker.runtime.health): a worker bootstep stamps the
heartbeat from the consumer's timer and `worker_ready` writes the readiness file; beat
runs `HeartbeatScheduler`, RedBeat plus a heartbeat that stops when its loop stops.
Metrics (worker.runtime.metrics) use prometheus-client's multiprocess mode, switched on in
`celeryd_init` before the prefork pool forks, and are served by the main process.
"""

from __future__ import annotations

import os
import time
from typing import Any

import structlog
from celery import Celery, bootsteps, signals
from kombu import Queue
from redbeat import RedBeatScheduler

from config.schedule import QUEUES, beat_schedule, redbeat_key_prefix
from config.settings import Settings, get_settings
from worker.runtime import health, metrics
from worker.runtime.logging import setup_logging

BEAT_MAX_LOOP_INTERVAL = 30


def beat_loop_interval(settings: Settings) -> int:
    """Well below the RedBeat lock timeout, so the active beat renews its lock in time
    (CELERY.md §3: a lapsed lock makes beat exit with LockNotOwnedError)."""
    return max(1, min(BEAT_MAX_LOOP_INTERVAL, settings.beat_lock_timeout_seconds // 5))

log = structlog.get_logger(__name__)


class WorkerHeartbeat(bootsteps.StartStopStep):
    """Stamps the worker heartbeat from the worker's own timer: with the event loop, that
    timer runs in the consumer loop, so a wedged main process stops stamping."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref: Any = None

    def start(self, worker: Any) -> None:
        global _heartbeat
        settings: Settings = worker.app.conf.oprecon_settings
        _heartbeat = health.Heartbeat(settings, "worker", worker.hostname)
        _heartbeat.beat()
        self.tref = worker.timer.call_repeatedly(
            settings.heartbeat_interval_seconds, _heartbeat.beat
        )

    def stop(self, worker: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        if _heartbeat is not None:
            _heartbeat.stop()


class HeartbeatScheduler(RedBeatScheduler):
    """RedBeat, plus beat's heartbeat: `active` while this beat holds the RedBeat lock and
    ticks, `standby` while it waits for the lock, nothing once its loop is stuck."""

    _last_tick: float | None = None
    _beat_heartbeat: health.BeatHeartbeat | None = None

    def setup_schedule(self) -> None:
        # Only the scheduler beat runs calls this: `celery beat` also builds a lazy one just
        # to print its banner, and that one must not stamp a (standby) heartbeat.
        super().setup_schedule()
        if self._beat_heartbeat is None:
            self._beat_heartbeat = health.BeatHeartbeat(
                self.app.conf.oprecon_settings, self._liveness, self.max_interval
            )
            self._beat_heartbeat.start()

    def _liveness(self) -> tuple[bool, float | None]:
        return self.lock is not None, self._last_tick

    def tick(self, *args: Any, **kwargs: Any) -> float:
        interval = super().tick(*args, **kwargs)
        self._last_tick = time.monotonic()
        return interval

    def close(self) -> None:
        if self._beat_heartbeat is not None:
            self._beat_heartbeat.stop()
            self._beat_heartbeat = None
        super().close()


_heartbeat: health.Heartbeat | None = None
_metrics_server: Any = None


def broker_transport_options(visibility: int) -> dict[str, Any]:
    """kombu sweeps for overdue unacked messages every interval × throttle seconds
    (10 × 10 by default): scaled to the visibility timeout, so a short one (a drill)
    is honoured within a few seconds and the default 2 h one costs one scan a minute."""
    interval = max(1, min(10, visibility // 60))
    return {"visibility_timeout": visibility, "unacked_restore_interval": interval,
            "unacked_restore_throttle": 1 if visibility < 600 else 6}


def make_celery_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery(
        "oprecon", include=["tasks.scans", "tasks.fixes", "tasks.digests", "tasks.health"]
    )
    visibility = settings.broker_visibility_timeout_seconds
    app.conf.update(
        broker_url=settings.broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options=broker_transport_options(visibility),
        # Declared, so a plain `celery worker` consumes all three (`-Q` narrows it).
        task_queues=[Queue(q, routing_key=q) for q in QUEUES],
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A lost broker connection does not cancel a running scan: it finishes and keeps
        # the scan lock, so the redelivered copy is skipped (tests/drills/test_drills_redis.py).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_default_queue="scan",
        task_routes={
            "oprecon.scan.*": {"queue": "scan"},
            "oprecon.verify.*": {"queue": "scan"},
            "oprecon.fix.*": {"queue": "fix"},
            "oprecon.digest.*": {"queue": "digest"},
            "oprecon.health.*": {"queue": "digest"},
        },
        task_soft_time_limit=settings.scan_soft_limit_seconds,
        task_time_limit=settings.scan_hard_limit_seconds,
        timezone="UTC",
        enable_utc=True,
        beat_schedule=beat_schedule(settings),
        beat_scheduler="worker.runtime.celery_app:HeartbeatScheduler",
        redbeat_redis_url=settings.redis_url,
        # Given explicitly: otherwise RedBeat falls back to the broker's transport options.
        redbeat_redis_options={"socket_timeout": 5, "socket_connect_timeout": 5,
                               "health_check_interval": 30},
        redbeat_key_prefix=redbeat_key_prefix(settings),
        redbeat_lock_timeout=settings.beat_lock_timeout_seconds,
        beat_max_loop_interval=beat_loop_interval(settings),
    )
    app.conf.oprecon_settings = settings
    app.steps["worker"].add(WorkerHeartbeat)
    return app


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    from config.settings import unknown_env

    settings = get_settings()
    setup_logging(settings.log_level, settings.log_format)
    unknown = unknown_env()
    if unknown:  # a typo'd variable silently leaves its setting at the default
        structlog.get_logger(__name__).warning(
            "unknown_environment_variables", names=unknown,
            hint="no setting reads them: a typo? (docs/operations.md)")


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        task_id=task_id, task_name=getattr(task, "name", None)
    )


@signals.task_postrun.connect
def _unbind_task(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()


def _settings_of(obj: Any) -> Settings:
    conf = getattr(getattr(obj, "app", None), "conf", None)
    found = getattr(conf, "oprecon_settings", None) if conf is not None else None
    return found if isinstance(found, Settings) else get_settings()


@signals.celeryd_init.connect
def _metrics_before_fork(instance: Any = None, **_: Any) -> None:
    """Multiprocess metrics must be chosen before the pool forks (worker.runtime.metrics)."""
    if _settings_of(instance).metrics_port:
        metrics.enable_multiprocess()


@signals.celeryd_init.connect
def _sources_usable(instance: Any = None, options: Any = None, **_: Any) -> None:
    """A worker that scans or fixes refuses to start without usable sources (a missing OP
    folder, say): one line and exit status 2, not a failure at every scan."""
    import sys

    from worker.scan.wiring import source_problem

    queues = (options or {}).get("queues") or []
    if isinstance(queues, str):
        queues = queues.split(",")
    if queues and not {"scan", "fix"} & {q.strip() for q in queues}:
        return  # a digest-only worker reads no source
    problem = source_problem(_settings_of(instance))
    if problem:
        sys.stderr.write(f"oprecon: {problem}\n")
        sys.stderr.flush()
        raise SystemExit(2)


@signals.worker_ready.connect
def _worker_ready(sender: Any = None, **_: Any) -> None:
    global _metrics_server
    settings = _settings_of(sender)
    if _heartbeat is not None:
        _heartbeat.mark_ready()
    if settings.metrics_port:
        try:
            _metrics_server = metrics.serve(settings.metrics_port)
            log.info("metrics_serving", port=settings.metrics_port)
        except OSError as err:  # e.g. a second worker on this host: it still works
            log.warning("metrics_not_served", port=settings.metrics_port,
                        error=type(err).__name__)
        _seed_last_success(settings)


def _seed_last_success(settings: Settings) -> None:
    """So the last-success gauge is right from the first scrape after a restart. A
    throw-away engine: pooled connections must not leak into pool children forked later."""
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import Session

    from worker.state.db import kv_get, make_engine

    engine = make_engine(settings.state_db_url)
    try:
        with Session(engine) as session:
            value = kv_get(session, settings.practice, "last_success") or {}
        at = health.parse_time(value.get("at"))
    except SQLAlchemyError:
        return
    finally:
        engine.dispose()
    if at is not None:
        metrics.run_recorded([], full_scope=False, success_at=at)


@signals.worker_shutdown.connect
def _worker_shutdown(**_: Any) -> None:
    global _metrics_server
    if _metrics_server is not None:
        _metrics_server.shutdown()
        _metrics_server = None
    metrics.cleanup_multiprocess()


@signals.worker_process_shutdown.connect
def _pool_child_gone(pid: int | None = None, **_: Any) -> None:
    metrics.child_exited(pid or os.getpid())


def _app_or_exit() -> Celery:
    """The app, or one line naming the bad setting and exit status 2: a Celery worker or
    beat started with a bad setting must not answer with a traceback."""
    import sys

    from config.settings import SettingsError

    try:
        return make_celery_app()
    except SettingsError as err:
        sys.stderr.write(f"oprecon: {err}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None


app = _app_or_exit()
