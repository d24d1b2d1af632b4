"""Drill: Redis restarted while tasks are queued and while a worker holds the scan lock.

Redis is a private redis-server (never the machine's 6379), configured as production
must configure the broker (docker-compose.yml): `appendonly yes` and `maxmemory-policy
noeviction`. A real worker runs a full scan held in its portal read by a latency fault,
with a second scan queued behind it; Redis is restarted under them.

Shown: the queued message and the held lock (with its expiry) survive the restart; the
worker reconnects by itself and runs both scans; the fixes the first scan journals are
applied exactly once, even when their messages are delivered twice; the lock is released.
And, as the reason for the settings: without persistence the queued message is gone.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from config.settings import Settings, load_settings
from tests.procs import CeleryWorker, RedisServer, base_env, send_task, wait_for
from worker.devtools.generator import generate_practice
from worker.devtools.simulator import SimulatorServer, start_simulator
from worker.state.db import make_engine, migrate, session_factory
from worker.state.models import ActionRow, Run

pytestmark = pytest.mark.services


@dataclass
class Rig:
    settings: Settings
    redis: RedisServer
    worker: CeleryWorker
    sim: SimulatorServer
    sim_url: str
    sessions: Any

    def runs(self, task_id: str) -> list[Run]:
        with self.sessions() as s:
            return list(s.scalars(select(Run).where(Run.practice == self.settings.practice,
                                                    Run.task_id == task_id).order_by(Run.id)))

    def succeeded(self, task_id: str) -> bool:
        return any(r.status == "succeeded" for r in self.runs(task_id))

    def actions(self) -> list[ActionRow]:
        with self.sessions() as s:
            return list(s.scalars(select(ActionRow).where(
                ActionRow.practice == self.settings.practice).order_by(ActionRow.id)))

    def calls(self) -> dict[str, Any]:
        calls: dict[str, Any] = httpx.get(f"{self.sim_url}/_sim/calls", timeout=5).json()
        return calls


@pytest.fixture
def rig(tmp_path: Path, pg_database: str) -> Iterator[Rig]:
    practice_dir = tmp_path / "practice"
    generate_practice(practice_dir, patients=200, seed=5, now=datetime.now(UTC))
    migrate(pg_database)
    engine = make_engine(pg_database)
    sim, sim_url = start_simulator(portal_dir=practice_dir / "portal",
                                   op_dir=practice_dir / "op")
    server = RedisServer(tmp_path / "redis")
    worker: CeleryWorker | None = None
    try:
        server.start()
        values = {
            "OPRECON_STATE_DB_URL": pg_database,
            "OPRECON_BROKER_URL": server.url(0),
            "OPRECON_REDIS_URL": server.url(1),
            "OPRECON_PRACTICE": f"drill-redis-{uuid.uuid4().hex[:6]}",
            "OPRECON_OP_DIR": str(practice_dir / "op"),
            "OPRECON_PORTAL_SOURCE": "http",
            "OPRECON_PORTAL_URL": sim_url,
            # Confirm at once, so the first scan journals fixes and queues them.
            "OPRECON_PROPAGATION_DELAY_MINUTES": "0",
            "OPRECON_ALLOW_UNSAFE_PROPAGATION_DELAY": "true",
            "OPRECON_METRICS_PORT": "0",
            "OPRECON_LOG_FORMAT": "json",
            "OPRECON_SCAN_SOFT_LIMIT_SECONDS": "20",
            "OPRECON_SCAN_HARD_LIMIT_SECONDS": "30",
            "OPRECON_BROKER_VISIBILITY_TIMEOUT_SECONDS": "180",
        }
        settings = load_settings(**{k.removeprefix("OPRECON_").lower(): v
                                    for k, v in values.items()})
        worker = CeleryWorker(tmp_path, base_env(**values))
        yield Rig(settings, server, worker, sim, sim_url, session_factory(engine))
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
        sim.shutdown()
        engine.dispose()


def test_redis_restart_under_a_running_scan_and_a_queued_one(rig: Rig) -> None:
    rig.worker.start().wait_ready()
    httpx.post(f"{rig.sim_url}/_sim/faults", timeout=5,
               json={"latency_ms": 4000, "count": 1, "path": "/users"})
    first = send_task(rig.settings.broker_url, "oprecon.scan.full")
    wait_for(lambda: rig.sim.request_counts().get("GET /users", 0) >= 1
             and rig.runs(first), 20, "the first scan to be inside its portal read")
    second = send_task(rig.settings.broker_url, "oprecon.scan.full")
    broker, locks = rig.redis.client(0), rig.redis.client(1)
    lock_key = f"oprecon:{rig.settings.practice}:scan"
    assert broker.llen("scan") == 1  # queued behind the running scan (prefetch 1)
    assert locks.exists(lock_key) == 1

    rig.redis.restart()

    broker, locks = rig.redis.client(0), rig.redis.client(1)
    assert broker.llen("scan") == 1, "the queued scan was lost in the restart"
    pttl = locks.pttl(lock_key)  # still held, and still bound to expire
    assert 0 < pttl <= rig.settings.lock_timeout_seconds * 1000, pttl

    wait_for(lambda: rig.succeeded(first) and rig.succeeded(second), 30,
             "both scans to succeed after the restart")
    rig.worker.check_alive()
    log = rig.worker.log()
    assert "Connection to broker lost" in log  # it noticed, and came back by itself
    # A run is recorded as succeeded inside the lock; the release follows a moment later.
    wait_for(lambda: locks.exists(lock_key) == 0, 10, "the scan lock to be released")

    # The first scan journaled the fixes and queued them after the restart; the second
    # found the same findings already queued and journaled nothing new.
    # A user's second stale link rides on that user's one source refresh (coalesced).
    wait_for(lambda: (a := rig.actions()) and all(x.status in ("applied", "coalesced")
                                                  for x in a), 20,
             "every journaled fix to be applied")
    journaled = rig.actions()
    assert {a.run_id for a in journaled} == {rig.runs(first)[0].id}
    actions = [a for a in journaled if a.status == "applied"]
    assert len(actions) >= 3
    keys = {a.idempotency_key for a in actions}

    def applied() -> dict[str, int]:
        return {w["key"]: w["applied"] for w in rig.calls()["writes"]}

    assert applied() == dict.fromkeys(keys, 1)
    writes_sent = sum(n for route, n in rig.calls()["requests"].items()
                      if not route.startswith("GET"))

    # A message delivered twice (what a lost ack after a restart means): the journal says
    # applied, and the portal is not called again.
    again = [send_task(rig.settings.broker_url, "oprecon.fix.apply", a.id) for a in actions]

    def finished() -> list[str]:
        return [e["event"] for e in rig.worker.events() for tid in again
                if e.get("event", "").startswith(f"Task oprecon.fix.apply[{tid}] succeeded")]

    done = wait_for(lambda: len(f := finished()) == len(again) and f, 20,
                    "the duplicate deliveries to finish")
    assert all(line.endswith("'applied'") for line in done), done  # the journal's answer
    assert applied() == dict.fromkeys(keys, 1)
    assert sum(n for route, n in rig.calls()["requests"].items()
               if not route.startswith("GET")) == writes_sent
    assert rig.redis.password not in log


def test_without_persistence_a_restart_loses_queued_messages(tmp_path: Path) -> None:
    """Why production needs `appendonly yes`: the broker is not a database otherwise."""
    server = RedisServer(tmp_path / "volatile", appendonly=False).start()
    try:
        send_task(server.url(0), "oprecon.scan.full")
        assert server.client(0).llen("scan") == 1
        server.restart()
        assert server.client(0).llen("scan") == 0
    finally:
        server.stop()
