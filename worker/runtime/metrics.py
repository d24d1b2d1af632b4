"""Prometheus metrics: scans, findings, fixes, portal calls and the last success.

Why multiprocess mode: Celery's prefork pool runs every task in a child process, so a
registry in the main process would never see what the tasks count, and a server in each
child cannot share one port. So, in the worker only (worker.runtime.celery_app):

1. `celeryd_init` (main process, before the pool forks) calls `enable_multiprocess`:
   PROMETHEUS_MULTIPROC_DIR points at a fresh private directory, and prometheus-client's
   value class switches to mmap files there. Children inherit both.
2. `worker_ready` calls `serve(port)`: the main process serves the sum of every child's
   files. `metrics_port = 0` skips both steps.

The metric objects are created lazily, on first use, so that choice is always made
before the first value exists. Everywhere else (CLI, beat, tests) they are ordinary
in-process metrics. Gauges use the `mostrecent` mode: the last write wins whichever
child made it.

Labels are kinds, statuses, check ids, severities and route templates: never a record
id, a name or an email.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections import Counter as Tally
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
    values,
)

SEVERITIES = ("info", "warning", "high")
_lock = threading.Lock()
_metrics: Metrics | None = None
_registry = CollectorRegistry()
_owned_dir: str | None = None


@dataclass
class Metrics:
    scans: Counter
    scan_seconds: Histogram
    findings: Gauge
    fixes: Counter
    portal_calls: Counter
    portal_errors: Counter
    portal_seconds: Histogram
    last_success: Gauge
    full_scan_missed: Counter


def _create() -> Metrics:
    r = _registry
    return Metrics(
        scans=Counter("oprecon_scans", "Scans by kind and outcome (succeeded, skipped, failed).",
                      ["kind", "status"], registry=r),
        scan_seconds=Histogram(
            "oprecon_scan_duration_seconds", "Wall time of a scan task.", ["kind"], registry=r,
            buckets=(0.1, 0.5, 1, 2.5, 5, 15, 30, 60, 120, 300, 600, 1200, 1800),
        ),
        findings=Gauge("oprecon_findings", "Findings of the last full-scope run.",
                       ["check", "severity"], registry=r, multiprocess_mode="mostrecent"),
        fixes=Counter("oprecon_fixes", "Fix attempts by kind and outcome.",
                      ["kind", "outcome"], registry=r),
        portal_calls=Counter("oprecon_portal_calls", "Portal HTTP attempts by route and status.",
                             ["method", "route", "status"], registry=r),
        portal_errors=Counter(
            "oprecon_portal_errors",
            "Portal attempts that say the portal is unwell (no answer, 429, 5xx).",
            ["method", "route"], registry=r,
        ),
        portal_seconds=Histogram(
            "oprecon_portal_call_seconds", "Latency of one portal HTTP attempt.",
            ["method", "route"], registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        ),
        last_success=Gauge(
            "oprecon_last_success_timestamp_seconds",
            "Unix time of the last successful scan the dead-man's switch counts.",
            registry=r, multiprocess_mode="mostrecent",
        ),
        full_scan_missed=Counter(
            "oprecon_full_scan_missed",
            "Deferred nightly full scans still not run at their deadline (alerted).",
            registry=r,
        ),
    )


def get() -> Metrics:
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = _create()
        return _metrics


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def enable_multiprocess(path: str | None = None) -> str:
    """Switch this process (and its future children) to multiprocess values.

    Call before the pool forks and before any metric is used. Without `path`, a fresh
    temporary directory: the files of an earlier run must never be summed with ours.
    """
    global _owned_dir
    with _lock:
        if _metrics is not None and multiprocess_dir() is None:
            raise RuntimeError("metrics were used before multiprocess mode was enabled")
    if path is None:
        path = multiprocess_dir() or tempfile.mkdtemp(prefix="oprecon-metrics-")
        if multiprocess_dir() is None:
            _owned_dir = path
    os.makedirs(path, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values.ValueClass = values.get_value_class()
    return path


def cleanup_multiprocess() -> None:
    """Remove the directory we created (worker shutdown)."""
    global _owned_dir
    if _owned_dir is not None:
        shutil.rmtree(_owned_dir, ignore_errors=True)
        _owned_dir = None


def child_exited(pid: int) -> None:
    """A pool child is gone: let prometheus-client drop its live-gauge files."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(pid)


def serving_registry() -> CollectorRegistry:
    """What the server exposes: every process's files in multiprocess mode, else ours."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return _registry


def serve(port: int, addr: str = "0.0.0.0") -> Any:
    """Start the /metrics HTTP server in a daemon thread (all interfaces: Prometheus
    scrapes from elsewhere; nothing exposed is PHI); returns the server."""
    server, _thread = start_http_server(port, addr=addr, registry=serving_registry())
    return server


def render() -> bytes:
    """The exposition text, as a scrape would see it (tests, `oprecon status`)."""
    return generate_latest(serving_registry())


# -- hooks -----------------------------------------------------------------------------------


def scan_finished(kind: str, status: str, seconds: float) -> None:
    m = get()
    m.scans.labels(kind=kind, status=status).inc()
    if status != "skipped":
        m.scan_seconds.labels(kind=kind).observe(seconds)


def full_scan_missed() -> None:
    get().full_scan_missed.inc()


def run_recorded(findings: list[tuple[str, str]], full_scope: bool, success_at: datetime | None
                 ) -> None:
    """After a committed run: the findings gauges (full-scope runs only: a one-patient run
    would make the practice look clean) and the last-success time."""
    m = get()
    if full_scope:
        from worker.checks.catalog import CHECK_IDS

        counts = Tally(findings)
        for check in CHECK_IDS:
            for severity in SEVERITIES:
                m.findings.labels(check=check, severity=severity).set(counts[(check, severity)])
    if success_at is not None:
        m.last_success.set(success_at.timestamp())


def fix_finished(kind: str, outcome: str) -> None:
    get().fixes.labels(kind=kind or "unknown", outcome=outcome).inc()


def _status_label(status: int | None) -> str:
    if status is None:
        return "error"
    if status == 429:
        return "429"
    return f"{status // 100}xx"


def portal_call(method: str, route: str, status: int | None, seconds: float) -> None:
    """HttpPortal's `on_call` hook; `route` is a template such as /users/{user_id}."""
    m = get()
    m.portal_calls.labels(method=method, route=route, status=_status_label(status)).inc()
    m.portal_seconds.labels(method=method, route=route).observe(seconds)
    if status is None or status == 429 or status >= 500:
        m.portal_errors.labels(method=method, route=route).inc()


def watch_portal(portal: Any) -> None:
    """Attach `portal_call` to a portal adapter that offers the hook and has none yet."""
    if hasattr(portal, "on_call") and getattr(portal, "on_call", None) is None:
        portal.on_call = portal_call
