"""Scheduling end to end: a real `celery worker` and `celery beat` (subprocesses) on the
local Redis (broker db 14, locks and RedBeat db 15) and a PostgreSQL state database, with
a 3-second incremental interval.

Shown here: scheduled scans land in the `runs` table; a scan that finds the single-flight
lock held is skipped and logged; an on-call `--patient` run completes (and waits for the
lock, saying so) while periodic work goes on; a second beat stands by instead of doubling
the schedule; worker logs are JSON with task ids and no PHI; health, status and metrics
against the live processes. Plus the time-limit ordering, checked against the one table
that documents it (docs/operations.md).

Every subprocess is stopped in teardown. This module flushes the broker and Redis test
databases: it must not share them with a concurrently running test session.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from procs import free_port, wait_for
from sqlalchemy import select

from config.settings import Settings, load_settings
from tests.conftest import BROKER_URL, REDIS_URL
from tests.factory import (
    MemorySource,
    clean_family,
    contact,
    fc,
    patient,
    patient_user,
)
from worker.model.records import (
    AuditEvent,
    CaregiverLink,
    Contact,
    FamilyContact,
    Patient,
    PortalSource,
    PortalUser,
)
from worker.state.db import kv_get
from worker.state.models import FindingRow, Run

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
INTERVAL_MINUTES = 0.05
INTERVAL = INTERVAL_MINUTES * 60  # 3 s between scheduled incremental scans
# A setting name with a letter missing (OPRECON_PROPAGATION_DELAY_MINUTES).
TYPO = "OPRECON_PROPAGATION_DELAY_MINUTS"
PHI = ("PatC1", "DoeC1", "PatC2", "DoeC2", "c1@example.org", "c2@example.org",
       "kid2@example.org", "wrong@example.org")


# -- time limits (no processes needed) ---------------------------------------------------------


def _documented_limits() -> dict[str, float]:
    """The "Time limits" table of docs/operations.md: `| what | `id` | seconds | why |`."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = text.split("## Time limits", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|[^|]*\|\s*`([a-z_.]+)`\s*\|\s*([\d.]+)\s*\|", section, re.M)
    return {key: float(value) for key, value in rows}


def test_time_limits_are_ordered_and_match_the_documented_table() -> None:
    import tasks.fixes
    import tasks.health
    import tasks.scans
    from config.schedule import beat_schedule
    from worker.cli import ondemand
    from worker.runtime import health
    from worker.runtime.celery_app import make_celery_app
    from worker.scan.locks import scan_lock

    settings = load_settings()
    app = make_celery_app(settings)
    fix = tasks.fixes.apply_fix
    actual = {
        "scan_soft_limit_seconds": app.conf.task_soft_time_limit,
        "scan_hard_limit_seconds": app.conf.task_time_limit,
        "lock_timeout_seconds": scan_lock(settings, redis.Redis()).timeout,
        "broker_visibility_timeout_seconds":
            app.conf.broker_transport_options["visibility_timeout"],
        "adhoc_lock_wait": inspect.signature(tasks.scans.adhoc_scan.run)
            .parameters["wait_seconds"].default,
        "scan_retry_backoff_max": tasks.scans.RETRY["retry_backoff_max"],
        "fix_lease_seconds": settings.fix_lease_seconds,
        "fix_resume_interval": beat_schedule(settings)["resume-pending-fixes"]["schedule"]
            .total_seconds(),
        "fix_soft_limit": fix.soft_time_limit,
        "fix_hard_limit": fix.time_limit,
        "fix_retry_backoff_max": fix.retry_backoff_max,
        "deadman_hard_limit": tasks.health.deadman.time_limit,
        "beat_max_loop_interval": app.conf.beat_max_loop_interval,
        "redbeat_lock_timeout": app.conf.redbeat_lock_timeout,
        "heartbeat_interval_seconds": settings.heartbeat_interval_seconds,
        "heartbeat_stale": health.stale_after(settings),
        "deadman_limit": health.deadman_limit(settings).total_seconds(),
    }
    assert _documented_limits() == actual  # the table is the truth, and it is true
    a = actual
    assert (a["scan_soft_limit_seconds"] < a["scan_hard_limit_seconds"]
            < a["lock_timeout_seconds"] < a["broker_visibility_timeout_seconds"])
    assert a["adhoc_lock_wait"] == ondemand.ADHOC_LOCK_WAIT_SECONDS
    assert a["adhoc_lock_wait"] < a["scan_soft_limit_seconds"]
    assert a["fix_soft_limit"] < a["fix_hard_limit"] < a["fix_lease_seconds"] \
        < a["broker_visibility_timeout_seconds"]
    # A fix claimed by a worker that died is sent again within a minute.
    assert a["fix_lease_seconds"] + a["fix_resume_interval"] <= 60
    assert a["fix_retry_backoff_max"] < a["broker_visibility_timeout_seconds"]
    assert a["scan_retry_backoff_max"] < a["broker_visibility_timeout_seconds"]
    assert a["beat_max_loop_interval"] * 2 < a["redbeat_lock_timeout"]
    assert a["heartbeat_interval_seconds"] < a["heartbeat_stale"]
    # Every task this app runs stops before the scan lock expires and long before the
    # broker would redeliver it.
    for name, task in app.tasks.items():
        if name.startswith("oprecon."):
            limit = task.time_limit or app.conf.task_time_limit
            assert limit < a["lock_timeout_seconds"] < a["broker_visibility_timeout_seconds"]
    # No periodic message outlives the period it was sent for.
    for entry in beat_schedule(settings).values():
        expires = entry["options"].get("expires")
        if expires is not None and isinstance(entry["schedule"], timedelta):
            assert expires <= entry["schedule"].total_seconds()


def test_settings_refuse_a_lock_that_outlives_the_visibility_timeout() -> None:
    from config.settings import SettingsError

    with pytest.raises(SettingsError, match="visibility"):
        load_settings(scan_soft_limit_seconds=20, scan_hard_limit_seconds=30,
                      broker_visibility_timeout_seconds=80)  # lock would be 90 s


def test_reconcile_with_the_broker_down_is_one_line_exit_2(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.cli.main import main

    settings = make_settings()
    monkeypatch.setenv("OPRECON_BROKER_URL", "redis://:pw@127.0.0.1:1/0")
    monkeypatch.setenv("OPRECON_STATE_DB_URL", settings.state_db_url)
    monkeypatch.setattr(sys, "argv", ["oprecon", "reconcile", "--patient", "P1", "--wait"])
    started = time.monotonic()
    with pytest.raises(SystemExit) as done:
        main()
    out, err = capsys.readouterr()
    assert done.value.code == 2 and out == ""
    assert err.count("\n") == 1 and "broker unreachable" in err
    assert "pw@" not in err and ":***@" in err
    assert time.monotonic() - started < 10


def _follow(make_settings: Any, monkeypatch: pytest.MonkeyPatch, seed: Callable[..., None],
            timeout: float = 3) -> tuple[int, str, str]:
    """enqueue_and_wait with the broker stubbed out and the worker's side seeded."""
    import io

    from worker.cli import ondemand
    from worker.scan.engine import ScopeRequest
    from worker.scan.wiring import state_sessions

    settings = make_settings()
    sessions = state_sessions(settings)
    monkeypatch.setattr(ondemand, "send", lambda s, r, task_id, expires=None: seed(
        sessions, settings.practice, task_id))
    monkeypatch.setattr(ondemand, "_worker_alive", lambda s: True)
    out, err = io.StringIO(), io.StringIO()
    code = ondemand.enqueue_and_wait(settings, ScopeRequest("patient", "P1"), True, False,
                                     timeout=timeout, poll_seconds=0.05, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _run_row(practice: str, task_id: str, status: str, **kw: Any) -> Run:
    now = datetime.now(UTC)
    return Run(practice=practice, kind="adhoc", scope="patient:P1", status=status,
               task_id=task_id, started_at=now, finished_at=now, **kw)


def test_follow_a_failed_run_exits_1_with_its_cause_masked(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def seed(sessions: Any, practice: str, task_id: str) -> None:
        with sessions.begin() as s:
            s.add(_run_row(practice, task_id, "failed",
                           error="SourceError: row 7 has email jane@example.org"))

    code, out, err = _follow(make_settings, monkeypatch, seed)
    assert code == 1 and "queued ad hoc reconcile of patient:P1" in out
    assert err.count("\n") == 1 and "failed: SourceError: row 7 has email [redacted]" in err
    assert "@" not in err


def test_follow_a_run_that_never_got_the_lock_exits_2(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.scan.progress import progress_key
    from worker.state.db import kv_set

    def seed(sessions: Any, practice: str, task_id: str) -> None:
        with sessions.begin() as s:
            kv_set(s, practice, progress_key(task_id),
                   {"state": "skipped", "wait_seconds": 120}, datetime.now(UTC))

    code, _, err = _follow(make_settings, monkeypatch, seed)
    assert code == 2 and "still held after 120 s" in err


def test_follow_times_out_while_queued_with_exit_2(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = _follow(make_settings, monkeypatch, lambda *a: None, timeout=0.5)
    assert code == 2 and "queued: waiting for a worker" in out
    assert "timed out after 0.5s" in err


def test_poll_reads_progress_then_the_run_row(make_settings: Any) -> None:
    from worker.cli.ondemand import poll
    from worker.scan.progress import progress_key, record
    from worker.scan.wiring import state_sessions
    from worker.state.db import kv_set

    settings = make_settings()
    sessions = state_sessions(settings)
    assert poll(sessions, settings, "t1").state == "queued"
    record(settings, "t1", "waiting_for_lock", wait_seconds=120)
    assert poll(sessions, settings, "t1").state == "waiting"
    record(settings, "t1", "started")
    assert poll(sessions, settings, "t1").state == "started"
    with sessions.begin() as s:
        s.add(_run_row("test", "t1", "running"))
        old = _run_row("test", "t2", "running")
        old.started_at -= timedelta(seconds=settings.scan_hard_limit_seconds + 61)
        s.add(old)
        kv_set(s, "test", progress_key("t3"), {"state": "failed", "error": "OperationalError"},
               datetime.now(UTC))
    assert poll(sessions, settings, "t1").state == "running"
    assert poll(sessions, settings, "t2").state == "lost"
    assert poll(sessions, settings, "t3").state == "failed"


# -- the live cluster ----------------------------------------------------------------------------
#
# Each live test gets a cluster of its own (`cluster`, function-scoped): a fresh practice
# id, so its runs, findings, watermark, scan lock, heartbeats and RedBeat keys start empty;
# an emptied broker; a worker and one beat (`beat-a`) started for it and stopped after it.
# Only what no test changes is shared: the practice's export files and the migrated
# database. So any test runs alone or in any order, and a test that kills a beat or
# starts a second one does so to its own cluster.


def _write_practice(root: Path) -> None:
    from worker.sources.csv_source import write_op_csv, write_portal_csv

    records = clean_family() + [
        patient("P2", email="kid2@example.org"), contact("C2"), fc("P2", "C2"),
        patient_user("U3", "P2", email="wrong@example.org"),
    ]
    src = MemorySource(records)
    write_op_csv(root / "op", src._of(Patient), src._of(Contact), src._of(FamilyContact))
    write_portal_csv(root / "portal", src._of(PortalUser), src._of(CaregiverLink),
                     src._of(PortalSource), src._of(AuditEvent))


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    settings: Settings
    metrics_port: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def worker_log(self) -> Path:
        return self.root / "worker.log"

    def hb_dir(self, name: str) -> Path:
        return self.root / f"hb-{name}"

    def start(self, name: str, *args: str,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        env = {**self.env, "OPRECON_HEARTBEAT_DIR": str(self.hb_dir(name)), **(env or {})}
        cwd = self.root / name
        cwd.mkdir(exist_ok=True)
        with (self.root / f"{name}.out").open("ab") as out, \
                (self.root / f"{name}.log").open("ab") as err:
            proc = subprocess.Popen(
                [str(BIN / "celery"), "-A", "worker.runtime.celery_app", *args,
                 "--loglevel", "INFO"],
                cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def stop_all(self) -> None:
        """SIGTERM every process group at once, then wait (SIGKILL what lingers): the
        processes shut down in parallel, not one after another."""
        procs = [p for p in self.procs.values() if p.poll() is None]
        self.procs.clear()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)

    def alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def log_lines(self, name: str, containing: str) -> list[str]:
        path = self.root / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return [line for line in text.splitlines() if containing in line]

    def sent_by(self, name: str, entry: str = "") -> int:
        """Tasks this beat sent (celery.beat logs each: "Sending due task <entry> (...)")."""
        return len(self.log_lines(name, f"Sending due task {entry}"))

    def oprecon(self, *args: str, hb: str = "worker", timeout: float = 60,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "OPRECON_HEARTBEAT_DIR": str(self.hb_dir(hb)), **(env or {})}
        return subprocess.run([str(BIN / "oprecon"), *args], env=env, cwd=self.root,
                              capture_output=True, text=True, timeout=timeout)

    def role(self, hb: str) -> str | None:
        """A beat's role as its container healthcheck reports it: active, standby or None."""
        probe = self.oprecon("health", "--process", "beat", "--json", hb=hb)
        checks = json.loads(probe.stdout)["checks"] if probe.stdout.strip() else []
        return checks[0].get("role") if checks and probe.returncode == 0 else None

    def sessions(self) -> Any:
        from worker.scan.wiring import state_sessions

        return state_sessions(self.settings, migrate_first=False)

    def runs(self, kind: str | None = None, since: datetime | None = None) -> list[Run]:
        with self.sessions()() as s:
            q = select(Run).where(Run.practice == self.settings.practice)
            if kind:
                q = q.where(Run.kind == kind)
            if since:
                q = q.where(Run.started_at >= since)
            return list(s.scalars(q.order_by(Run.started_at)))

    def succeeded(self, n: int, kind: str = "incremental") -> list[Run]:
        """The first `n` succeeded runs of `kind`, once there are that many (else [])."""
        done = [r for r in self.runs(kind) if r.status == "succeeded"]
        return done[:n] if len(done) >= n else []

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.worker_log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def skip_a_scan(self) -> tuple[str, dict[str, Any]]:
        """Hold the scan lock, queue an incremental scan, and wait for the worker to skip
        it: (its task id, the `scan_skipped` log event)."""
        from worker.runtime.celery_app import make_celery_app
        from worker.scan.locks import holder_token, scan_lock

        lock = scan_lock(self.settings)
        # A scan may be running now; this process holds it as a scan would (its token).
        assert lock.acquire(blocking=True, blocking_timeout=10, token=holder_token())
        task_id = f"overlap-{uuid.uuid4().hex[:8]}"
        app = make_celery_app(self.settings)
        try:
            app.send_task("oprecon.scan.incremental", task_id=task_id)
            skipped = wait_for(
                lambda: [e for e in self.log_events()
                         if e.get("event") == "scan_skipped" and e.get("task_id") == task_id],
                15, "the skipped scan in the worker log")
        finally:
            lock.release()
            app.close()
        return task_id, skipped[0]


def _flush_test_redis() -> None:
    for url in (BROKER_URL, REDIS_URL):
        client = redis.Redis.from_url(url)
        try:
            client.flushdb()
        except redis.ConnectionError as err:
            pytest.fail(f"Redis is not reachable at {url}: {err}")
        finally:
            client.close()


@pytest.fixture(scope="module")
def practice_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The practice's exports: read by every cluster, changed by none."""
    root = tmp_path_factory.mktemp("practice")
    _write_practice(root)
    return root


@pytest.fixture(scope="module")
def state_db(pg_database: str) -> str:
    """The PostgreSQL state database, migrated once; each cluster has its own practice in it."""
    from worker.state.db import migrate

    migrate(pg_database)
    return pg_database


@pytest.fixture
def cluster(tmp_path: Path, practice_dir: Path, state_db: str) -> Iterator[Cluster]:
    root = tmp_path
    practice = f"sched-{uuid.uuid4().hex[:6]}"
    values = {
        "OPRECON_STATE_DB_URL": state_db,
        "OPRECON_BROKER_URL": BROKER_URL,
        "OPRECON_REDIS_URL": REDIS_URL,
        "OPRECON_OP_DIR": str(practice_dir / "op"),
        "OPRECON_PORTAL_DIR": str(practice_dir / "portal"),
        "OPRECON_PRACTICE": practice,
        "OPRECON_INCREMENTAL_SCAN_MINUTES": str(INTERVAL_MINUTES),
        "OPRECON_HEARTBEAT_INTERVAL_SECONDS": "1",
        "OPRECON_BEAT_LOCK_TIMEOUT_SECONDS": "10",  # a standby takes over within ~10 s
        "OPRECON_LOG_FORMAT": "json",
        "OPRECON_LOG_LEVEL": "INFO",
    }
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPRECON_")}
    # Celery warns on stderr when run as root (CI containers): not a log line.
    env.update(values, OPRECON_METRICS_PORT=str(port),
               PYTHONWARNINGS="ignore:You're running the worker with superuser privileges")
    _flush_test_redis()  # no message or lock left by an earlier test's cluster
    settings = load_settings(
        state_db_url=state_db, broker_url=BROKER_URL, redis_url=REDIS_URL,
        practice=practice, incremental_scan_minutes=INTERVAL_MINUTES, metrics_port=0,
        heartbeat_dir=root / "hb-worker", heartbeat_interval_seconds=1,
    )
    c = Cluster(root, env, settings, port)
    try:
        # With a misspelt setting, as operators make them: the worker says so at start.
        c.start("worker", "worker", "-c", "2", "-n", "sched@%h", "--without-mingle",
                "--without-gossip", env={TYPO: "20"})
        c.start("beat-a", "beat")

        def ready() -> bool:
            c.alive("worker")
            c.alive("beat-a")
            return (c.hb_dir("worker") / "worker.ready").exists()

        wait_for(ready, 40, "the worker's readiness file", every=0.1)
        yield c
    finally:
        c.stop_all()
        c.sessions().kw["bind"].dispose()  # before the session's database is dropped
        _flush_test_redis()


@pytest.mark.services
def test_scheduled_scans_run_on_time_and_are_recorded(cluster: Cluster) -> None:
    done = wait_for(lambda: cluster.succeeded(3), 25, "three scheduled incremental scans")
    assert not [r for r in cluster.runs() if r.status == "failed"]
    # The first reads everything (no watermark yet); later ones what changed since.
    assert done[0].scope == "all" and done[0].records_read == 11
    assert all(r.task_id and r.scope.startswith("entities:") for r in done[1:]), [
        (r.task_id, r.scope) for r in done]
    starts = [r.started_at for r in done]
    gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:], strict=False)]
    assert all(INTERVAL * 0.5 <= g <= INTERVAL * 2 for g in gaps), gaps
    with cluster.sessions()() as s:
        last = kv_get(s, cluster.settings.practice, "last_success")
    assert last is not None and last["kind"] in ("incremental", "full")


@pytest.mark.services
def test_a_scan_that_finds_the_lock_held_is_skipped_and_logged(cluster: Cluster) -> None:
    task_id, skipped = cluster.skip_a_scan()
    assert skipped["kind"] == "incremental" and "another scan" in skipped["reason"]
    # Issue 18: it used to leave no run row at all (and Celery reported a success); now
    # one row records the skip, why, and who holds the lock.
    (run,) = [r for r in cluster.runs() if r.task_id == task_id]
    assert (run.kind, run.status) == ("incremental", "skipped")
    assert run.error is not None and "another scan" in run.error
    assert f" pid {os.getpid()}" in run.error  # this process holds it, as a scan would


@pytest.mark.services
def test_a_scan_that_expires_in_the_queue_leaves_a_skipped_run(cluster: Cluster) -> None:
    """Issue 18: incremental scans that waited past their `expires` were dropped by
    Celery without a trace. Now the drop is a skipped run row."""
    from worker.runtime.celery_app import make_celery_app

    task_id = f"expired-{uuid.uuid4().hex[:8]}"
    app = make_celery_app(cluster.settings)
    try:
        app.send_task("oprecon.scan.incremental", task_id=task_id,
                      expires=datetime.now(UTC) - timedelta(seconds=1))
    finally:
        app.close()
    (run,) = wait_for(lambda: [r for r in cluster.runs() if r.task_id == task_id], 20,
                      "the expired scan's run row")
    assert (run.kind, run.status) == ("incremental", "skipped")
    assert run.error is not None and "expired in the queue" in run.error


@pytest.mark.services
def test_adhoc_patient_run_completes_while_periodic_work_goes_on(cluster: Cluster) -> None:
    before = datetime.now(UTC)
    done = cluster.oprecon("reconcile", "--patient", "P2", "--wait", "--timeout", "40")
    assert done.returncode == 0, done.stdout + done.stderr
    task_id = re.search(r"as task (\S+)", done.stdout).group(1)  # type: ignore[union-attr]
    summary = re.search(r"done: run (\d+) · adhoc patient:P2", done.stdout)
    assert summary, done.stdout
    assert "patient_email_present" in done.stdout  # the finding table for that family
    (adhoc,) = [r for r in cluster.runs("adhoc") if r.task_id == task_id]
    assert adhoc.id == int(summary.group(1)) and adhoc.status == "succeeded"
    assert adhoc.started_at >= before
    wait_for(lambda: [r for r in cluster.runs("incremental", since=adhoc.finished_at)
                      if r.status == "succeeded"],
             3 * INTERVAL, "a scheduled scan after the ad hoc run")

    # The guide's checklist first (issue 16 #6), the same facts --local prints.
    steps = done.stdout.split("Steps for patient:P2:")[1].split("done: run")[0]
    local = cluster.oprecon("reconcile", "--patient", "P2", "--local")
    assert local.returncode == 0, local.stderr
    local_steps = local.stdout.split("Steps for patient:P2:")[1]
    facts = [ln.split(". ", 1)[1] for ln in steps.splitlines() if ". " in ln]
    assert any(f.startswith("patient P2: Active, chart email present") for f in facts), steps
    assert any(f.startswith("family contact C2 as Mother, authority Joint") for f in facts)
    assert [f for f in facts if f.startswith(("patient P2", "family contact", "  "))] == [
        ln.split(". ", 1)[1] for ln in local_steps.splitlines()
        if ". " in ln and ln.split(". ", 1)[1].startswith(("patient P2", "family contact",
                                                           "  "))]
    # The detail column uses the terminal's width: whole details at COLUMNS=250.
    wide = cluster.oprecon("reconcile", "--patient", "P2", "--wait", "--timeout", "40",
                           env={"COLUMNS": "250"})
    with cluster.sessions()() as s:
        details = list(s.scalars(select(FindingRow.detail).where(
            FindingRow.practice == cluster.settings.practice, FindingRow.patient_id == "P2")))
    assert details and any(len(d) > 80 for d in details)
    assert all(d in wide.stdout for d in details), wide.stdout
    narrow = cluster.oprecon("reconcile", "--patient", "P2", "--wait", "--timeout", "40",
                             env={"COLUMNS": "120"})
    table_lines = narrow.stdout.split("done: run")[1].splitlines()[1:]
    assert table_lines and all(len(ln) <= 120 for ln in table_lines), narrow.stdout
    assert "…" in narrow.stdout  # cut to fit, and says so

    as_json = cluster.oprecon("reconcile", "--patient", "P2", "--wait", "--json",
                              "--timeout", "40")
    assert as_json.returncode == 0, as_json.stderr
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    checks = {row["check"]: row for row in lines}
    assert checks["patient_email_present"]["action"] == "alert"
    assert set(checks["patient_email_present"]) >= {"check", "severity", "action",
                                                    "fingerprint", "patient_id", "detail"}


@pytest.mark.services
def test_adhoc_run_waits_for_the_lock_and_says_so(cluster: Cluster) -> None:
    """A run of the whole practice waits for the practice lock (a family run does not:
    the next test)."""
    from worker.scan.locks import scan_lock

    lock = scan_lock(cluster.settings)
    assert lock.acquire(blocking=True, blocking_timeout=10)
    env = {**cluster.env, "OPRECON_HEARTBEAT_DIR": str(cluster.hb_dir("worker"))}
    lines: list[str] = []
    with subprocess.Popen(
        [str(BIN / "oprecon"), "reconcile", "--all", "--wait", "--timeout", "40"],
        env=env, cwd=cluster.root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    ) as proc:
        stdout = proc.stdout
        assert stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(iter(stdout.readline, "")),
                                  daemon=True)
        reader.start()
        try:
            wait_for(lambda: any("waiting for the scan lock held by another scan" in line
                                 for line in lines), 20, "the waiting message")
            task_id = re.search(r"as task (\S+)", lines[0]).group(1)  # type: ignore[union-attr]
            with cluster.sessions()() as s:
                progress = kv_get(s, cluster.settings.practice, f"adhoc:{task_id}")
            assert progress is not None and progress["state"] == "waiting_for_lock"
            assert not [r for r in cluster.runs() if r.task_id == task_id]
        finally:
            lock.release()
        assert proc.wait(timeout=30) == 0, lines
        reader.join(timeout=5)
    assert any(line.startswith("done: run") for line in lines), lines


@pytest.mark.services
def test_adhoc_patient_run_is_not_blocked_by_a_practice_scan(cluster: Cluster) -> None:
    """Issue 18: each `--patient` run held the practice lock and waited for any scan of
    the whole practice. With the lock held as a long full scan holds it, the run is
    answered at once (it reads only its family and writes under the short write lock)."""
    from worker.scan.locks import scan_lock

    lock = scan_lock(cluster.settings)
    assert lock.acquire(blocking=True, blocking_timeout=10)
    try:
        started = time.monotonic()
        done = cluster.oprecon("reconcile", "--patient", "P2", "--wait", "--timeout", "20")
        elapsed = time.monotonic() - started
    finally:
        lock.release()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "waiting for the scan lock" not in done.stdout
    assert "patient_email_present" in done.stdout
    assert elapsed < 15, elapsed
    task_id = re.search(r"as task (\S+)", done.stdout).group(1)  # type: ignore[union-attr]
    (run,) = [r for r in cluster.runs("adhoc") if r.task_id == task_id]
    assert run.status == "succeeded" and run.scope == "patient:P2"


@pytest.mark.services
def test_the_verify_tick_does_not_collide_with_a_practice_scan(cluster: Cluster) -> None:
    """Issue 18: beat sends the verify tick 50 ms after the incremental scan and it was
    skipped on the lock. It now reads its due families without the practice lock."""
    from worker.runtime.celery_app import make_celery_app
    from worker.scan.locks import scan_lock

    wait_for(lambda: cluster.succeeded(1), 25, "a first scan")
    past = datetime.now(UTC) - timedelta(minutes=1)
    with cluster.sessions().begin() as s:
        row = s.scalar(select(FindingRow).where(
            FindingRow.practice == cluster.settings.practice,
            FindingRow.check == "patient_email_present"))
        assert row is not None
        row.state, row.next_check_at, row.state_changed_at = "held", past, past
    lock = scan_lock(cluster.settings)
    assert lock.acquire(blocking=True, blocking_timeout=10)
    task_id = f"verify-{uuid.uuid4().hex[:8]}"
    try:
        make_celery_app(cluster.settings).send_task("oprecon.verify.tick", task_id=task_id)
        (run,) = wait_for(lambda: [r for r in cluster.runs("verify") if r.task_id == task_id
                                   and r.status != "running"], 20, "the verify run")
    finally:
        lock.release()
    assert run.status == "succeeded", run.error
    assert run.scope.startswith("entities:1 due hold")


@pytest.mark.services
def test_a_skipped_nightly_full_scan_is_deferred_and_run_by_a_scheduled_scan(
    cluster: Cluster,
) -> None:
    """Issue 18: the nightly full scan sent while a scan held the lock was skipped after
    1.5 ms and never retried. Now it leaves a skipped run row and a deferral, and the
    next scheduled scan to get the lock runs the full scan."""
    from worker.runtime.celery_app import make_celery_app
    from worker.scan.locks import scan_lock

    lock = scan_lock(cluster.settings)
    assert lock.acquire(blocking=True, blocking_timeout=10)
    task_id = f"full-{uuid.uuid4().hex[:8]}"
    try:
        make_celery_app(cluster.settings).send_task("oprecon.scan.full", task_id=task_id)
        (skipped,) = wait_for(lambda: [r for r in cluster.runs("full")
                                       if r.task_id == task_id], 20, "the skipped full scan")
        assert skipped.status == "skipped"
        with cluster.sessions()() as s:
            owed = kv_get(s, cluster.settings.practice, "full_scan_deferred")
        assert owed is not None and owed["deadline"] > owed["since"]
        status = cluster.oprecon("status")
        assert "full scan  deferred since" in status.stdout, status.stdout
    finally:
        lock.release()
    full = wait_for(lambda: [r for r in cluster.runs("full", since=skipped.started_at)
                             if r.status == "succeeded"], 6 * INTERVAL,
                    "the deferred full scan, run by a scheduled scan")
    assert full[0].scope == "all" and full[0].task_id != task_id

    def cleared() -> bool:
        with cluster.sessions()() as s:
            return kv_get(s, cluster.settings.practice, "full_scan_deferred") is None

    wait_for(cleared, 10, "the deferral to be cleared after the full scan")


@pytest.mark.services
def test_a_second_beat_stands_by_instead_of_doubling_the_schedule(cluster: Cluster) -> None:
    """RedBeat's lock: while beat-a lives, a second beat started by mistake never holds the
    lock and sends nothing. Seen in Redis (the lock keeps one owner throughout) and in each
    beat's own log, over three of beat-a's sends: counted events, not a clock."""
    from config.schedule import redbeat_key_prefix

    lock_key = f"{redbeat_key_prefix(cluster.settings)}:lock"
    client = redis.Redis.from_url(REDIS_URL)
    owners: set[bytes | None] = set()
    try:
        wait_for(lambda: cluster.sent_by("beat-a", "incremental-scan"), 20,
                 "beat-a's first scheduled scan")
        cluster.start("beat-b", "beat")
        wait_for(lambda: cluster.role("beat-b") == "standby", 30, "beat-b's standby heartbeat",
                 every=0.2)
        owners.add(client.get(lock_key))
        sent_before = cluster.sent_by("beat-a", "incremental-scan")

        def three_more_from_beat_a() -> bool:
            cluster.alive("beat-a")
            cluster.alive("beat-b")
            owners.add(client.get(lock_key))
            return cluster.sent_by("beat-a", "incremental-scan") >= sent_before + 3

        wait_for(three_more_from_beat_a, 10 * INTERVAL, "three more scans sent by beat-a",
                 every=0.2)
        ttl = client.pttl(lock_key)
    finally:
        client.close()
    assert cluster.sent_by("beat-b") == 0, cluster.log_tail("beat-b")  # not doubled
    assert not cluster.log_lines("beat-b", "beat: Acquired lock"), cluster.log_tail("beat-b")
    (owner,) = owners  # one lock token from start to end: beat-a's, never beat-b's
    assert owner is not None and ttl > 0
    assert cluster.log_lines("beat-a", "beat: Acquired lock")

    assert cluster.role("beat-b") == "standby"
    report = json.loads(cluster.oprecon("health", "--json").stdout)
    beat = next(c for c in report["checks"] if c["name"] == "beat")
    assert beat["ok"] and beat["active"] == 1 and beat["standby"] == 1, report


@pytest.mark.services
def test_health_status_and_metrics_against_the_live_processes(cluster: Cluster) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    # What the metrics below count happens here: two scheduled scans and a skipped one.
    wait_for(lambda: cluster.succeeded(2), 25, "two scheduled incremental scans")
    cluster.skip_a_scan()

    health = cluster.oprecon("health")
    assert health.returncode == 0, health.stdout + health.stderr
    assert health.stdout.strip().splitlines()[-1] == "healthy"
    assert "sched@" in health.stdout
    for process, hb in (("worker", "worker"), ("beat", "beat-a")):
        probe = cluster.oprecon("health", "--process", process, hb=hb)
        assert probe.returncode == 0, probe.stdout

    status = cluster.oprecon("status")
    assert status.returncode == 0, status.stderr
    assert "dead-man's switch ok" in status.stdout
    next_due = r"incremental-scan\s+oprecon\.scan\.incremental\s+every 3s\s+(in \d+s|\d+s ago)"
    assert re.search(next_due, status.stdout), status.stdout
    assert re.search(r"queues     scan \d+ · fix \d+ · digest \d+", status.stdout)
    st = json.loads(cluster.oprecon("status", "--json").stdout)
    assert st["errors"] == [] and st["runs"] and st["last_success"]["age_seconds"] < 2 * INTERVAL

    def scrape() -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
        body = urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics",
                                      timeout=5).read().decode()
        return body, {(s.name, tuple(sorted(s.labels.items()))): s.value
                      for fam in text_string_to_metric_families(body) for s in fam.samples}

    skipped = ("oprecon_scans_total", (("kind", "incremental"), ("status", "skipped")))
    # The skip was logged by the pool child; its counter file may be written a moment later.
    body, samples = wait_for(lambda: (lambda m: m if m[1].get(skipped) else None)(scrape()),
                             10, "the skipped scan in the metrics", every=0.2)
    # Counted in the prefork children, served by the main process (multiprocess mode).
    assert samples[skipped] >= 1
    assert samples[("oprecon_scans_total",
                    (("kind", "incremental"), ("status", "succeeded")))] >= 2
    assert samples[("oprecon_last_success_timestamp_seconds", ())] > time.time() - 3 * INTERVAL
    assert samples[("oprecon_findings",
                    (("check", "patient_email_present"), ("severity", "warning")))] == 1
    assert not any(p in body for p in PHI)


@pytest.mark.services
def test_worker_logs_are_json_with_task_ids_and_no_phi(cluster: Cluster) -> None:
    wait_for(lambda: cluster.succeeded(2), 25, "two scheduled incremental scans")
    text = cluster.worker_log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), [
        line for line in lines if not line.startswith("{")][:5]
    events = [json.loads(line) for line in lines]
    # The misspelt OPRECON_ variable it was started with: one warning line, naming it
    # (its setting silently keeps its default otherwise), not one per pool process.
    typos = [e for e in events if e.get("event") == "unknown_environment_variables"]
    assert [(e["level"], e["names"]) for e in typos] == [("warning", [TYPO])], typos
    assert "typo" in typos[0]["hint"]
    finished = [e for e in events if e.get("event") == "run_finished"]
    assert finished and all(e.get("task_id") and e.get("task_name") for e in finished)
    assert {e["level"] for e in events} <= {"debug", "info", "warning", "error", "critical"}
    assert not [p for p in PHI if p in text]


@pytest.mark.services
def test_a_standby_beat_takes_over_when_the_active_one_is_killed(cluster: Cluster) -> None:
    """The test kills its cluster's beat-a. RedBeat's lock lapses (10 s here, 300 s by
    default) and the standby becomes the one active beat; scheduled scans go on."""
    cluster.start("beat-c", "beat")
    wait_for(lambda: cluster.role("beat-c") == "standby", 30, "beat-c to stand by", every=0.2)
    active = cluster.procs.pop("beat-a")
    os.killpg(active.pid, signal.SIGKILL)
    active.wait(timeout=5)
    killed_at = datetime.now(UTC)
    wait_for(lambda: cluster.role("beat-c") == "active", 40, "beat-c to take over the lock",
             every=0.2)
    wait_for(lambda: cluster.sent_by("beat-c", "incremental-scan"), 30,
             "a scheduled scan sent by the new beat")
    wait_for(lambda: cluster.runs("incremental", since=killed_at), 30,
             "a scheduled scan run after the kill")
    report = json.loads(cluster.oprecon("health", "--json").stdout)
    beat = next(c for c in report["checks"] if c["name"] == "beat")
    assert beat["ok"] and beat["active"] == 1, report
