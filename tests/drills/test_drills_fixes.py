"""Drills: exactly one portal call per fix, with real Celery workers on PostgreSQL.

Each drill journals N `set_dummy_email` fixes (a child's portal user with a real
address) into a PostgreSQL state database, then lets real `celery worker` processes
(prefork, one slot each) consume the `fix` queue of a private redis-server, against the
portal simulator over HTTP. The simulator counts every request it receives, so
`PATCH /users/{user_id}` is the number of portal calls, whatever the idempotency keys
would have deduplicated. Its clock is frozen: a change never shows when re-read, so the
only thing standing between a second delivery and a second call is the claim.

1. Two workers, every fix sent twice: the second delivery meets the claim.
2. A worker's pool child SIGKILLed while the portal holds its call: the message comes
   back at once and meets the live claim; a real beat's resume tick takes the fix back
   once the lease lapses and the recovery does not call again (the portal cannot show
   it yet) but holds the finding.
3. The broker redelivers a message still running past its (shortened) visibility
   timeout to the other worker: the redelivered copy meets the claim.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from config.settings import Settings, load_settings
from tests.factory import patient, patient_user
from tests.procs import BIN, CeleryWorker, RedisServer, base_env, send_task, wait_for
from worker.devtools.simulator import SimClock, Simulator, SimulatorServer, start_simulator
from worker.fixes import claims
from worker.scan.engine import Deps, reconcile, utcnow
from worker.sources.csv_source import CsvOPSource, write_op_csv
from worker.sources.portal_http import HttpPortal
from worker.state.db import make_engine, migrate, session_factory
from worker.state.models import ActionRow, FindingRow

pytestmark = pytest.mark.services

PATCH = "PATCH /users/{user_id}"
APPLY = "oprecon.fix.apply"
SIM_T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@dataclass
class Rig:
    root: Path
    settings: Settings
    env: dict[str, str]
    redis: RedisServer
    server: SimulatorServer
    url: str
    sessions: Any
    action_ids: list[int]
    procs: list[Any] = field(default_factory=list)

    def worker(self, name: str) -> CeleryWorker:
        worker = CeleryWorker(self.root, self.env, name)
        self.procs.append(worker)
        return worker

    def beat(self) -> subprocess.Popen[bytes]:
        cwd = self.root / "beat"
        cwd.mkdir(exist_ok=True)
        with (self.root / "beat.log").open("ab") as log:
            proc = subprocess.Popen(
                [str(BIN / "celery"), "-A", "worker.runtime.celery_app", "beat",
                 "--loglevel", "INFO"],
                cwd=cwd, env={**self.env, "OPRECON_HEARTBEAT_DIR": str(self.root / "hb-beat")},
                stdout=log, stderr=log, start_new_session=True)
        self.procs.append(proc)
        return proc

    def send(self, action_id: int) -> str:
        """As the scan task does: the message, then the sent stamp."""
        task_id = send_task(self.settings.broker_url, APPLY, action_id)
        claims.mark_enqueued(self.sessions, [action_id], utcnow())
        return task_id

    def hold_writes(self, latency_ms: int, count: int) -> None:
        httpx.post(f"{self.url}/_sim/faults", timeout=5,
                   json={"latency_ms": latency_ms, "count": count, "path": "/users/"})

    def portal_calls(self) -> int:
        return self.server.request_counts().get(PATCH, 0)

    def applied_per_key(self) -> dict[str, int]:
        return {w["key"]: w["applied"] for w in self.server.simulator.store.write_counts()
                if w["endpoint"] == PATCH}

    def actions(self) -> dict[int, ActionRow]:
        with self.sessions() as s:
            return {a.id: a for a in s.scalars(select(ActionRow).where(
                ActionRow.practice == self.settings.practice))}

    def finding(self, action: ActionRow) -> FindingRow:
        with self.sessions() as s:
            row = s.get(FindingRow, action.finding_id)
            assert row is not None
            return row

    def broker_idle(self) -> bool:
        broker = self.redis.client(0)
        try:
            return broker.llen("fix") == 0 and broker.hlen("unacked") == 0
        finally:
            broker.close()

    def events(self, *names: str) -> list[dict[str, Any]]:
        return [e for p in self.procs if isinstance(p, CeleryWorker)
                for e in p.events() if e.get("event") in names]


@pytest.fixture
def make_rig(tmp_path: Path, pg_database: str) -> Iterator[Any]:
    rigs: list[Rig] = []
    migrate(pg_database)
    engine = make_engine(pg_database)

    def build(n: int, **env: str) -> Rig:
        op_dir = tmp_path / "op"
        write_op_csv(op_dir, [patient(f"P{i:02d}") for i in range(n)], [], [])
        sim = Simulator(clock=SimClock(SIM_T0))
        sim.load(users=[patient_user(f"U{i:02d}", f"P{i:02d}", email=f"kid{i}@example.org")
                        for i in range(n)])
        server, url = start_simulator(sim)
        redis_server = RedisServer(tmp_path / "redis").start()
        values = {
            "OPRECON_STATE_DB_URL": pg_database,
            "OPRECON_BROKER_URL": redis_server.url(0),
            "OPRECON_REDIS_URL": redis_server.url(1),
            "OPRECON_PRACTICE": f"drill-fix-{uuid.uuid4().hex[:6]}",
            "OPRECON_OP_DIR": str(op_dir),
            "OPRECON_PORTAL_SOURCE": "http",
            "OPRECON_PORTAL_URL": url,
            "OPRECON_PORTAL_MAX_RETRIES": "0",
            "OPRECON_PORTAL_RATE_PER_SECOND": "50",
            "OPRECON_PROPAGATION_DELAY_MINUTES": "0",
            "OPRECON_ALLOW_UNSAFE_PROPAGATION_DELAY": "true",
            "OPRECON_MASS_CHANGE_MAX_FIXES": "100",
            "OPRECON_MASS_CHANGE_MAX_PERCENT": "0",
            "OPRECON_METRICS_PORT": "0",
            "OPRECON_LOG_FORMAT": "json",
            "OPRECON_LOG_LEVEL": "INFO",
            **env,
        }
        settings = load_settings(**{k.removeprefix("OPRECON_").lower(): v
                                    for k, v in values.items()})
        sessions = session_factory(engine)
        portal = HttpPortal(url, None, max_retries=0)
        try:
            result = reconcile(Deps(settings, sessions, CsvOPSource(op_dir), portal,
                                    portal_writable=True), kind="full", now=utcnow())
        finally:
            portal.close()
        assert len(result.action_ids) == n
        rig = Rig(tmp_path, settings, base_env(**values), redis_server, server, url, sessions,
                  sorted(result.action_ids))
        rigs.append(rig)
        return rig

    try:
        yield build
    finally:
        for rig in rigs:
            for proc in rig.procs:
                if isinstance(proc, CeleryWorker):
                    proc.stop()
                elif proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=15)
            rig.redis.stop()
            rig.server.shutdown()
            rig.server.simulator.close()
        engine.dispose()


def test_two_workers_and_every_fix_sent_twice_make_one_portal_call_per_fix(
    make_rig: Any
) -> None:
    n = 6
    rig: Rig = make_rig(n)
    workers = [rig.worker("w1").start("fix"), rig.worker("w2").start("fix")]
    for w in workers:
        w.wait_ready()
    # Each call takes 1.5 s at the portal: the copy the other worker takes arrives
    # while the first is still in its call.
    rig.hold_writes(latency_ms=1500, count=n)
    for action_id in rig.action_ids:
        rig.send(action_id)
        rig.send(action_id)

    def finished() -> bool:
        for w in workers:
            w.check_alive()
        done = {a.status for a in rig.actions().values()} == {"applied"}
        return done and rig.broker_idle()

    wait_for(finished, 90, "every fix applied and all 12 messages acked")
    assert rig.portal_calls() == n  # exactly one portal call per fix
    assert rig.applied_per_key() == {a.idempotency_key: 1 for a in rig.actions().values()}
    met_claim = rig.events("fix_claimed_elsewhere")
    skipped = met_claim + rig.events("fix_already_done")
    assert len(skipped) == n  # every second delivery stopped before the portal
    assert met_claim, "no second delivery ran while the first was in its call"
    assert {rig.finding(a).state for a in rig.actions().values()} == {"held"}


def test_a_worker_killed_mid_call_is_taken_back_by_the_resume_tick_and_not_called_again(
    make_rig: Any
) -> None:
    n = 3
    rig: Rig = make_rig(n, OPRECON_FIX_LEASE_SECONDS="10")
    worker = rig.worker("w1").start("fix")
    worker.wait_ready()
    rig.hold_writes(latency_ms=4000, count=1)  # the first call sits at the portal
    first = rig.action_ids[0]
    for action_id in rig.action_ids:
        rig.send(action_id)

    def in_call() -> bool:
        worker.check_alive()
        row = rig.actions()[first]
        return row.status == "applying" and row.called_at is not None \
            and rig.portal_calls() == 1

    wait_for(in_call, 30, "the first fix to be inside its portal call")
    worker.kill_pool_child()
    killed_at = utcnow()
    # The message is requeued at once (reject_on_worker_lost) and meets the live claim.
    wait_for(lambda: rig.events("fix_claimed_elsewhere"), 30,
             "the requeued message to meet the claim")
    wait_for(lambda: all(rig.actions()[i].status == "applied" for i in rig.action_ids[1:]),
             30, "the other fixes to be applied")
    assert rig.actions()[first].status == "applying"  # nobody touches a live claim

    rig.beat()  # the real schedule: oprecon.fix.resume every 15 s
    wait_for(lambda: rig.actions()[first].status == "unconfirmed", 60,
             "the resume tick to take the dead worker's fix back")
    taken_back = (utcnow() - killed_at).total_seconds()
    assert taken_back < 60
    worker.check_alive()

    row = rig.actions()[first]
    assert row.called_at is not None and row.claimed_by != rig.events(
        "fix_claimed_elsewhere")[0]["task_id"]  # a new task (the resume's) recovered it
    held = rig.finding(row)
    assert held.state == "held"
    assert held.next_check_at == row.called_at + rig.settings.hold
    wait_for(lambda: rig.applied_per_key().get(row.idempotency_key) == 1, 10,
             "the killed call to land at the portal")
    assert rig.portal_calls() == n  # the killed call was not made a second time
    assert rig.applied_per_key() == {a.idempotency_key: 1 for a in rig.actions().values()}
    print(f"\ndrill 2: fix {first} taken back {taken_back:.1f}s after the kill; "
          f"{rig.portal_calls()} portal calls for {n} fixes")


def test_a_redelivery_after_the_visibility_timeout_meets_the_claim(make_rig: Any) -> None:
    # A short visibility timeout the settings accept (> scan lock = hard + slack), and a
    # lease, fix time limits and portal deadlines that outlast a 14 s portal call.
    rig: Rig = make_rig(
        1, OPRECON_SCAN_SOFT_LIMIT_SECONDS="1", OPRECON_SCAN_HARD_LIMIT_SECONDS="2",
        OPRECON_SCAN_LOCK_SLACK_SECONDS="1",
        OPRECON_BROKER_VISIBILITY_TIMEOUT_SECONDS="6", OPRECON_FIX_LEASE_SECONDS="120",
        OPRECON_PORTAL_TIMEOUT_SECONDS="110", OPRECON_PORTAL_REQUEST_DEADLINE_SECONDS="110")
    workers = [rig.worker("w1").start("fix"), rig.worker("w2").start("fix")]
    for w in workers:
        w.wait_ready()
    rig.hold_writes(latency_ms=14_000, count=1)
    (action_id,) = rig.action_ids
    task_id = rig.send(action_id)
    wait_for(lambda: rig.portal_calls() == 1, 30, "the call to reach the portal")

    def redelivered() -> list[dict[str, Any]]:
        for w in workers:
            w.check_alive()
        return [e for e in rig.events("fix_claimed_elsewhere", "fix_already_done")
                if e.get("task_id") == task_id]

    # Due 6 s after the delivery; kombu sweeps every second. A generous bound: a loaded
    # machine (other test sessions) slows the sweep, not the rule.
    seen = wait_for(redelivered, 180, "the broker to redeliver the running message")
    assert seen[0]["event"] == "fix_claimed_elsewhere"  # it arrived mid-call
    wait_for(lambda: rig.actions()[action_id].status == "applied" and rig.broker_idle(), 60,
             "the first delivery to finish")
    assert rig.portal_calls() == 1
    assert len([e for e in rig.events("fix_applied") if e.get("task_id") == task_id]) == 1
