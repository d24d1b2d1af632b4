"""Drill: the state database (PostgreSQL) unavailable at start and in the middle of a run.

oprecon reaches the local PostgreSQL through a TCP proxy (tests/procs.py) that the drill
cuts: new connections are refused and open ones are closed under the client, as when the
database restarts or the network drops. The machine's PostgreSQL itself is never touched.

Shown: down at start, a scan raises a clear OperationalError (and releases the scan
lock), the CLI says so in one line and exits 2, and a real worker retries the scan task
with backoff until the database is back; cut in the middle of a run — during the portal
read, or after the findings were written but before the commit — no run is recorded as
succeeded and no finding is left behind (the sync is one transaction), and the next run
completes with every finding.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

import tasks.scans
from config.settings import Settings
from tests.procs import (
    CeleryWorker,
    RedisServer,
    TcpProxy,
    base_env,
    oprecon,
    redis_fixture,
    send_task,
    wait_for,
)
from worker.devtools.generator import generate_practice
from worker.devtools.simulator import SimulatorServer, start_simulator
from worker.runtime import service
from worker.runtime.logging import setup_logging
from worker.scan import engine as engine_module
from worker.sources.base import SourceUnavailable
from worker.state.db import make_engine, migrate, session_factory
from worker.state.models import FindingRow, Run

pytestmark = pytest.mark.services


@dataclass
class Rig:
    root: Path
    proxy: TcpProxy
    settings: Settings  # state database through the proxy
    direct: sessionmaker[Session]  # the same database, bypassing the proxy
    sim: SimulatorServer
    sim_url: str
    manifest: set[str]
    env: dict[str, str]

    def runs(self) -> list[Run]:
        with self.direct() as s:
            return list(s.scalars(select(Run).where(Run.practice == self.settings.practice)
                                  .order_by(Run.id)))

    def findings(self) -> list[str]:
        with self.direct() as s:
            return list(s.scalars(select(FindingRow.fingerprint).where(
                FindingRow.practice == self.settings.practice)))

    def hold_users_page(self, ms: int) -> None:
        httpx.post(f"{self.sim_url}/_sim/faults", timeout=5,
                   json={"latency_ms": ms, "count": 1, "path": "/users"})


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Our JSON logging, captured: what an operator would read about the outage."""
    stream = io.StringIO()
    setup_logging("INFO", "json", stream=stream)
    yield stream
    setup_logging("WARNING", "json")


private_redis = redis_fixture()


@pytest.fixture
def redis_client(private_redis: RedisServer) -> redis.Redis:
    """This module's own Redis (locks, and the worker case's broker)."""
    return private_redis.client(1)


@pytest.fixture
def rig(tmp_path: Path, pg_database: str, make_settings: Any, private_redis: RedisServer,
        logs: io.StringIO) -> Iterator[Rig]:
    practice_dir = tmp_path / "practice"
    generate_practice(practice_dir, patients=200, seed=9, now=datetime.now(UTC))
    manifest = {json.loads(line)["fingerprint"]
                for line in (practice_dir / "manifest.jsonl").read_text().splitlines()}
    migrate(pg_database)
    direct = make_engine(pg_database)
    proxy = TcpProxy(make_url(pg_database).port or 5432).start()
    via_proxy = make_url(pg_database).set(port=proxy.port).render_as_string(False)
    sim, sim_url = start_simulator(portal_dir=practice_dir / "portal",
                                   op_dir=practice_dir / "op")
    settings = make_settings(
        state_db_url=via_proxy, practice=f"drill-pg-{uuid.uuid4().hex[:6]}",
        op_dir=practice_dir / "op", portal_source="http", portal_url=sim_url,
        redis_url=private_redis.url(1), broker_url=private_redis.url(0),
    )
    env = base_env(
        OPRECON_STATE_DB_URL=via_proxy, OPRECON_REDIS_URL=settings.redis_url,
        OPRECON_BROKER_URL=settings.broker_url, OPRECON_PRACTICE=settings.practice,
        OPRECON_OP_DIR=str(practice_dir / "op"), OPRECON_PORTAL_DIR=str(practice_dir / "portal"),
        OPRECON_METRICS_PORT="0", OPRECON_LOG_FORMAT="json",
    )
    try:
        yield Rig(tmp_path, proxy, settings, session_factory(direct), sim, sim_url, manifest,
                  env)
    finally:
        proxy.stop()
        sim.shutdown()
        from worker.scan.wiring import _sessions_for

        # The process-wide engine for the proxied URL: closed before the database goes.
        _sessions_for(via_proxy).kw["bind"].dispose()
        direct.dispose()


def test_down_at_start_a_scan_raises_a_clear_error_and_frees_the_lock(
    rig: Rig, redis_client: redis.Redis
) -> None:
    rig.proxy.cut()
    with pytest.raises(OperationalError) as caught:
        service.scan(rig.settings, "full")
    assert "Connection refused" in str(caught.value)
    assert redis_client.exists(f"oprecon:{rig.settings.practice}:scan") == 0
    assert rig.runs() == []  # nothing could be recorded, and nothing claims success


def test_down_at_start_the_cli_says_so_in_one_line(rig: Rig) -> None:
    rig.proxy.cut()
    done = oprecon("reconcile", "--all", "--local", env=rig.env, cwd=rig.root)
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("oprecon: could not run: OperationalError:")
    assert "Connection refused" in line


def test_scan_tasks_retry_what_may_pass_with_capped_backoff() -> None:
    """The policy the worker case below relies on, for every scan task (read from the
    registered tasks, not from eager calls)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from worker.runtime.celery_app import app

    for task in (tasks.scans.full_scan, tasks.scans.incremental_scan, tasks.scans.adhoc_scan):
        expected = {OperationalError, RedisConnectionError, SourceUnavailable}
        assert set(task.autoretry_for) == expected
        assert task.retry_backoff == 15 and task.retry_jitter is True
        assert task.max_retries == 4
        visibility = app.conf.broker_transport_options["visibility_timeout"]
        assert task.retry_backoff_max * task.max_retries < visibility


def test_a_real_worker_retries_the_scan_until_the_database_is_back(rig: Rig) -> None:
    rig.proxy.cut()
    worker = CeleryWorker(rig.root, rig.env)
    try:
        worker.start().wait_ready()
        task_id = send_task(rig.settings.broker_url, "oprecon.scan.full")
        retry = wait_for(lambda: [e for e in worker.events() if e.get("task_id") == task_id
                                  and "retry: Retry in" in e.get("event", "")],
                         15, "the worker to schedule a retry")
        assert "OperationalError" in retry[0]["event"]
        rig.proxy.restore()
        # Full jitter: the retry comes 0-15 s after the failure (in the rare case it came
        # before the restore, the next one within 0-30 s more).
        done = wait_for(lambda: [r for r in rig.runs() if r.task_id == task_id
                                 and r.status == "succeeded"], 50, "the retried scan")
        assert [r.status for r in rig.runs()] == ["succeeded"]
        assert done[0].findings_total == len(rig.manifest)
    finally:
        worker.stop()


def test_cut_during_the_portal_read_no_success_no_findings_then_recovery(
    rig: Rig, logs: io.StringIO
) -> None:
    rig.hold_users_page(1500)

    def cut_when_reading() -> None:
        wait_for(lambda: rig.sim.request_counts().get("GET /users", 0) >= 1, 10,
                 "the scan to reach its portal read")
        rig.proxy.cut()

    cutter = threading.Thread(target=cut_when_reading)
    cutter.start()
    try:
        with pytest.raises(OperationalError):
            service.scan(rig.settings, "full")
    finally:
        cutter.join()
    rig.proxy.restore()
    (lost,) = rig.runs()
    assert lost.status == "running"  # could not even record its failure; never "succeeded"
    assert rig.findings() == []
    said = [json.loads(line) for line in logs.getvalue().splitlines()]
    assert [e["run_id"] for e in said if e["event"] == "run_fail_not_recorded"] == [lost.id]

    outcome = service.scan(rig.settings, "full")  # pooled connections died: pre-ping copes
    assert outcome.status == "succeeded"
    assert sorted(rig.findings()) == sorted(rig.manifest)
    assert [r.status for r in rig.runs()] == ["running", "succeeded"]


def test_cut_after_the_findings_are_written_before_the_commit(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_sync = engine_module.sync
    written: list[int] = []

    def sync_then_cut(session: Session, *args: Any, **kwargs: Any) -> Any:
        result = real_sync(session, *args, **kwargs)
        session.flush()
        written.append(session.scalar(select(func.count()).select_from(FindingRow).where(
            FindingRow.practice == rig.settings.practice)) or 0)
        rig.proxy.cut()  # the findings are in the open transaction, not committed
        return result

    monkeypatch.setattr(engine_module, "sync", sync_then_cut)
    with pytest.raises(OperationalError):
        service.scan(rig.settings, "full")
    monkeypatch.undo()
    rig.proxy.restore()
    assert written == [len(rig.manifest)]  # they were all there, inside the transaction
    assert rig.findings() == []  # and none survived the lost connection
    assert [r.status for r in rig.runs()] == ["running"]

    assert service.scan(rig.settings, "full").status == "succeeded"
    assert sorted(rig.findings()) == sorted(rig.manifest)


def test_workers_starting_together_on_a_fresh_database_all_migrate() -> None:
    """Each worker process migrates on start; four at once on an empty PostgreSQL must
    not trip over each other's CREATE TABLE (one migrates, the others find it done)."""
    from tests.conftest import _throwaway_database

    for url in _throwaway_database("oprecon_migrate"):
        code = "import sys; from worker.state.db import migrate; migrate(sys.argv[1])"
        procs = [subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE,
                                  text=True) for _ in range(4)]
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                heads = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
                tables = conn.exec_driver_sql(
                    "SELECT count(*) FROM information_schema.tables WHERE table_name = 'runs'"
                ).scalar()
        finally:
            engine.dispose()
        assert len(heads) == 1 and tables == 1
