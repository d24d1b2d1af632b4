"""The Celery application: the only module in worker/ that imports Celery.

Settings follow CELERY.md: JSON only, late acks with requeue on a lost worker (every
task is idempotent), prefetch 1, no results stored (outcomes live in SQL), our own
logging instead of Celery's, one queue per concern, RedBeat so two beats cannot
double the schedule, and every time limit below the broker's visibility timeout.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Celery, signals

from config.schedule import beat_schedule
from config.settings import Settings, get_settings
from worker.logging import setup_logging

QUEUES = ("scan", "fix", "digest")


def make_celery_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("oprecon", include=["tasks.scans", "tasks.fixes", "tasks.digests"])
    visibility = settings.broker_visibility_timeout_seconds
    app.conf.update(
        broker_url=settings.broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": visibility},
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
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
        beat_scheduler="redbeat.RedBeatScheduler",
        redbeat_redis_url=settings.redis_url,
        redbeat_key_prefix=f"oprecon:{settings.practice}:redbeat",
        redbeat_lock_timeout=300,
        beat_max_loop_interval=30,
    )
    app.conf.oprecon_settings = settings
    return app


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_format)


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        task_id=task_id, task_name=getattr(task, "name", None)
    )


@signals.task_postrun.connect
def _unbind_task(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()


app = make_celery_app()
