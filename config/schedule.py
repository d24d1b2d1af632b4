"""The beat schedule: one table, every periodic task oprecon runs.

Exactly one beat may run: the app uses RedBeat, whose Redis lock lets a second beat
started by mistake wait as a standby instead of doubling the schedule.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery.schedules import crontab

from config.settings import Settings

QUEUES = ("scan", "fix", "digest")  # one per concern (CELERY.md §1 row 5)
RESUME_SECONDS = 15


def redbeat_key_prefix(settings: Settings) -> str:
    """RedBeat's keys for this practice: `<prefix>:lock`, `<prefix>:schedule` (a sorted set
    of entry keys scored by their next due time) and `<prefix><entry name>`."""
    return f"oprecon:{settings.practice}:redbeat"


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    return {
        "incremental-scan": {
            "task": "oprecon.scan.incremental",
            "schedule": timedelta(minutes=settings.incremental_scan_minutes),
            "options": {"queue": "scan", "expires": settings.incremental_scan_minutes * 60},
        },
        "full-scan-nightly": {
            "task": "oprecon.scan.full",
            "schedule": crontab(minute=15, hour=settings.full_scan_hour),
            "options": {"queue": "scan"},
        },
        "verify-due-holds": {
            "task": "oprecon.verify.tick",
            "schedule": timedelta(minutes=1),
            "options": {"queue": "scan", "expires": 60},
        },
        # Often, and cheap (one indexed query): a fix claimed by a worker that died is
        # sent again within one tick of its lease lapsing (fix_lease_seconds + 15 s).
        "resume-pending-fixes": {
            "task": "oprecon.fix.resume",
            "schedule": timedelta(seconds=RESUME_SECONDS),
            "options": {"queue": "fix", "expires": RESUME_SECONDS},
        },
        "digest-tick": {
            "task": "oprecon.digest.tick",
            "schedule": timedelta(minutes=5),
            "options": {"queue": "digest", "expires": 300},
        },
        "dead-mans-switch": {
            "task": "oprecon.health.deadman",
            "schedule": timedelta(minutes=10),
            "options": {"queue": "digest", "expires": 600},
        },
    }
