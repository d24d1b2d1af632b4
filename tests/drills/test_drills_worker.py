"""Drill: a worker killed with SIGKILL in the middle of a full scan.

A real `celery worker -c 1 -P prefork` reads a generated practice: OP from CSV, the
portal through the simulator over HTTP, with a latency fault that holds the scan in its
read for a few seconds; state in PostgreSQL, broker and locks on a private redis-server.

Shown: killing the pool child (what the OOM killer does) requeues the message
(acks_late + reject_on_worker_lost) and the redelivered scan completes at once instead
of being skipped behind its own dead lock; killing the whole worker leaves the message
in the broker's unacked set, from which a restarted worker takes it once the visibility
timeout has passed. Either way the interrupted run is recorded as failed, never as
succeeded, the lock carries an expiry no longer than the scan lock timeout, and the
findings table equals the generator's manifest: nothing lost, nothing doubled.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
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

from config.settings import Settings, load_settings
from tests.drills.test_drills_privacy import phi_of_practice
from tests.procs import (
    CeleryWorker,
    RedisServer,
    base_env,
    redis_fixture,
    send_task,
    wait_for,
)
from worker.devtools.generator import generate_practice
from worker.devtools.simulator import SimulatorServer, start_simulator
from worker.scan.locks import ScanBusy, single_flight
from worker.state.db import make_engine, migrate, session_factory
from worker.state.models import FindingRow, Run

pytestmark = pytest.mark.services

HOLD_MS = 4000  # how long the portal sits on the first /users page: the kill window


@dataclass
class Rig:
    root: Path
    settings: Settings
    redis: RedisServer
    worker: CeleryWorker
    sim: SimulatorServer
    sim_url: str
    sessions: Any
    manifest: dict[str, str]
    env: dict[str, str]

    @property
    def lock_key(self) -> str:
        return f"oprecon:{self.settings.practice}:scan"

    def runs(self, task_id: str) -> list[Run]:
        with self.sessions() as s:
            return list(s.scalars(select(Run).where(Run.practice == self.settings.practice,
                                                    Run.task_id == task_id).order_by(Run.id)))

    def hold_users_page(self) -> None:
        httpx.post(f"{self.sim_url}/_sim/faults", timeout=5,
                   json={"latency_ms": HOLD_MS, "count": 1, "path": "/users"})

    def users_requests(self) -> int:
        return self.sim.request_counts().get("GET /users", 0)

    def findings(self) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(FindingRow.fingerprint)
                                  .where(FindingRow.practice == self.settings.practice)))


@pytest.fixture
def rig(tmp_path: Path, pg_database: str) -> Iterator[Rig]:
    practice_dir = tmp_path / "practice"
    # Generated "now", so the scan's real clock agrees with the manifest's.
    generate_practice(practice_dir, patients=400, seed=7, now=datetime.now(UTC))
    manifest = {}
    for line in (practice_dir / "manifest.jsonl").read_text().splitlines():
        item = json.loads(line)
        manifest[item["fingerprint"]] = item["check"]
    migrate(pg_database)
    engine = make_engine(pg_database)
    sim, sim_url = start_simulator(portal_dir=practice_dir / "portal",
                                   op_dir=practice_dir / "op")
    server = RedisServer(tmp_path / "redis")
    worker: CeleryWorker | None = None
    try:
        server.start()
        practice = f"drill-kill-{uuid.uuid4().hex[:6]}"
        values = {
            "OPRECON_STATE_DB_URL": pg_database,
            "OPRECON_BROKER_URL": server.url(0),
            "OPRECON_REDIS_URL": server.url(1),
            "OPRECON_PRACTICE": practice,
            "OPRECON_OP_DIR": str(practice_dir / "op"),
            "OPRECON_PORTAL_SOURCE": "http",
            "OPRECON_PORTAL_URL": sim_url,
            "OPRECON_METRICS_PORT": "0",
            "OPRECON_LOG_FORMAT": "json",
            "OPRECON_LOG_LEVEL": "INFO",
            # Small limits, within the settings' ordering rules: the lock then expires
            # after 90 s at most, and the broker redelivers after 180 s.
            "OPRECON_SCAN_SOFT_LIMIT_SECONDS": "20",
            "OPRECON_SCAN_HARD_LIMIT_SECONDS": "30",
            "OPRECON_BROKER_VISIBILITY_TIMEOUT_SECONDS": "180",
            # Heartbeats and scan leases go stale after 3 s: a dead worker shows quickly.
            "OPRECON_HEARTBEAT_INTERVAL_SECONDS": "1",
        }
        settings = load_settings(**{k.removeprefix("OPRECON_").lower(): v
                                    for k, v in values.items()})
        worker = CeleryWorker(tmp_path, base_env(**values))
        yield Rig(tmp_path, settings, server, worker, sim, sim_url, session_factory(engine),
                  manifest, base_env(**values))
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
        sim.shutdown()
        engine.dispose()


def _assert_nothing_lost_or_doubled(rig: Rig) -> None:
    prints = rig.findings()
    assert len(prints) == len(set(prints))
    assert set(prints) == set(rig.manifest), (
        f"missing {set(rig.manifest) - set(prints)}, extra {set(prints) - set(rig.manifest)}")


def _assert_lock_expires(rig: Rig) -> None:
    """Held by a dead scan, the lock still goes away by itself within its timeout."""
    pttl = rig.redis.client(1).pttl(rig.lock_key)
    assert pttl == -2 or 0 < pttl <= rig.settings.lock_timeout_seconds * 1000, pttl


def _wait_mid_read(rig: Rig, task_id: str) -> None:
    """The run is recorded as running and the portal is sitting on its /users request."""
    def mid_read() -> bool:
        rig.worker.check_alive()
        running = [r for r in rig.runs(task_id) if r.status == "running"]
        return bool(running) and rig.users_requests() >= 1

    wait_for(mid_read, 20, "the scan to be inside its portal read")


def test_pool_child_killed_mid_scan_the_redelivered_scan_completes(rig: Rig) -> None:
    rig.worker.start().wait_ready()
    rig.hold_users_page()
    task_id = send_task(rig.settings.broker_url, "oprecon.scan.full")
    _wait_mid_read(rig, task_id)

    killed = rig.worker.kill_pool_child()
    _assert_lock_expires(rig)
    started = time.monotonic()
    done = wait_for(lambda: [r for r in rig.runs(task_id) if r.status == "succeeded"], 20,
                    "the redelivered scan to succeed")
    # Redelivered at once, not after the lock's 90 s expiry.
    assert time.monotonic() - started < 15
    rig.worker.check_alive()
    assert killed not in rig.worker.pool_children()

    first, second = rig.runs(task_id)
    assert (second.id, second.status) == (done[0].id, "succeeded")
    assert first.status == "failed" and "interrupted" in (first.error or ""), first.error
    assert [e for e in rig.worker.events_named("scan_lock_reclaimed")
            if e.get("task_id") == task_id]
    assert not rig.worker.events_named("scan_skipped")
    _assert_nothing_lost_or_doubled(rig)
    broker = rig.redis.client(0)
    # The run commits before the task returns and acks: give the ack a moment.
    wait_for(lambda: broker.llen("scan") == 0 and broker.hlen("unacked") == 0, 10,
             "the redelivered scan to be acked exactly once")
    assert rig.redis.client(1).exists(rig.lock_key) == 0  # released after the scan

    # What a crash adds to the log (tracebacks, Celery's own lines) names no one and no
    # password; the privacy drill checks ordinary runs.
    text = rig.worker.log()
    assert "WorkerLostError" in text  # Celery did notice the lost child
    assert rig.redis.password not in text
    leaked = [v for v in phi_of_practice(rig.root / "practice") if v in text]
    assert leaked == []


def test_whole_worker_killed_mid_scan_the_message_survives_and_completes(rig: Rig) -> None:
    rig.worker.start().wait_ready()
    rig.hold_users_page()
    task_id = send_task(rig.settings.broker_url, "oprecon.scan.full")
    _wait_mid_read(rig, task_id)

    rig.worker.kill()
    _assert_lock_expires(rig)
    broker = rig.redis.client(0)
    (tag,) = broker.hkeys("unacked")  # delivered, never acked: it is still in the broker
    assert json.loads(broker.hget("unacked", tag))[0]["headers"]["id"] == task_id
    # Fast-forward the broker's clock for this message: pretend the visibility timeout
    # (180 s here, 2 h by default) has passed since it was delivered.
    broker.zadd("unacked_index", {tag: time.time() - 181})

    rig.worker.start().wait_ready()
    # kombu looks for overdue messages 10 s after the worker starts consuming.
    done = wait_for(lambda: [r for r in rig.runs(task_id) if r.status == "succeeded"], 30,
                    "the restored scan to succeed")
    first, second = rig.runs(task_id)
    assert second.id == done[0].id
    assert first.status == "failed" and "interrupted" in (first.error or "")
    _assert_nothing_lost_or_doubled(rig)
    with rig.sessions() as s:
        succeeded = s.scalar(select(func.count()).select_from(Run).where(
            Run.practice == rig.settings.practice, Run.status == "succeeded"))
    assert succeeded == 1
    wait_for(lambda: broker.hlen("unacked") == 0 and broker.llen("scan") == 0, 10,
             "the restored scan to be acked")
    assert rig.redis.client(1).exists(rig.lock_key) == 0


def test_whole_worker_killed_during_an_on_call_run_is_reported_lost_and_its_lock_freed(
    rig: Rig,
) -> None:
    """Issue 16 #3: `reconcile --all --wait` says the worker died (not "timed out after
    300s while running"), status shows the run lost with its cause before anything else
    runs, and a live worker's verify tick marks it lost and frees the scan lock at once,
    so the next scan runs instead of being skipped until the lock expires."""
    from tests.procs import BIN

    rig.worker.start().wait_ready()
    rig.hold_users_page()
    cli = subprocess.Popen(
        [str(BIN / "oprecon"), "reconcile", "--all", "--wait", "--timeout", "120"],
        env=rig.env, cwd=rig.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert cli.stdout is not None
        first = cli.stdout.readline()
        task_id = first.split(" as task ")[1].strip()
        _wait_mid_read(rig, task_id)
        rig.worker.kill()
        started = time.monotonic()
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(timeout=5)
    assert cli.returncode == 1, (out, err)
    assert "stopped heart-beating" in err and "The worker died mid-run" in err, err
    assert "timed out" not in err
    assert time.monotonic() - started < 30  # seconds after the kill, not the timeout

    status = subprocess.run([str(BIN / "oprecon"), "status", "--json"], env=rig.env,
                            cwd=rig.root, capture_output=True, text=True, timeout=60)
    st = json.loads(status.stdout)
    (run,) = [r for r in st["runs"] if r["task_id"] == task_id]
    assert run["status"] == "lost" and "stopped heart-beating" in run["error"]
    assert any("stopped heart-beating" in e for e in st["errors"])
    assert rig.redis.client(1).exists(rig.lock_key) == 1  # still held by the dead run

    # Another worker (another container, say) comes up; its verify tick reaps the run.
    other = CeleryWorker(rig.root, rig.env, name="other").start()
    try:
        other.wait_ready()
        send_task(rig.settings.broker_url, "oprecon.verify.tick")
        wait_for(lambda: [r.status for r in rig.runs(task_id)] == ["lost"], 30,
                 "the verify tick to mark the run lost")
        assert rig.redis.client(1).exists(rig.lock_key) == 0
        assert [e for e in other.events_named("scan_lost") if e.get("lock_released")]
        (row,) = rig.runs(task_id)
        assert (row.error or "").startswith("its worker stopped heart-beating")
        # The next scan is not skipped behind the dead run's lock.
        full = send_task(rig.settings.broker_url, "oprecon.scan.full")
        wait_for(lambda: [r for r in rig.runs(full) if r.status == "succeeded"], 60,
                 "the next full scan to run")
        assert not other.events_named("scan_skipped")
    finally:
        other.stop()


# -- the lock's take-over rule, without a worker -------------------------------------------


private_redis = redis_fixture()


@pytest.fixture
def lock_settings(make_settings: Any, private_redis: RedisServer) -> Settings:
    settings: Settings = make_settings(practice=f"drill-lock-{uuid.uuid4().hex[:6]}",
                                       redis_url=private_redis.url(1))
    return settings


@pytest.fixture
def redis_client(private_redis: RedisServer) -> redis.Redis:
    """This module's own Redis, under the name tests/conftest.py gives the shared one."""
    return private_redis.client(1)


def test_a_lock_held_by_a_live_scan_is_never_taken_over(lock_settings: Settings) -> None:
    """The case a broker connection loss creates: the same message delivered again while
    its first attempt still runs. The second attempt must be skipped, not run alongside."""
    with single_flight(lock_settings), pytest.raises(ScanBusy), single_flight(lock_settings):
        pass


@pytest.mark.parametrize("holder", ["elsewhere.example|4242|99|x", "a-uuid-from-redis-py"])
def test_a_lock_held_elsewhere_waits_for_its_expiry(
    lock_settings: Settings, redis_client: Any, holder: str
) -> None:
    key = f"oprecon:{lock_settings.practice}:scan"
    redis_client.set(key, holder, px=60_000)
    with pytest.raises(ScanBusy), single_flight(lock_settings):
        pass
    assert redis_client.get(key) == holder.encode()


def test_a_lock_whose_holder_died_is_taken_over_at_once(
    lock_settings: Settings, redis_client: Any
) -> None:
    key = f"oprecon:{lock_settings.practice}:scan"
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from config.settings import load_settings\n"
         "from worker.scan.locks import single_flight\n"
         f"s = load_settings(redis_url={lock_settings.redis_url!r}, "
         f"practice={lock_settings.practice!r}, metrics_port=0)\n"
         "with single_flight(s):\n"
         "    print('held', flush=True)\n"
         "    time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True, env=base_env(),
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        dead_holder = redis_client.get(key)
        os.kill(child.pid, signal.SIGKILL)
        # Not reaped yet (we are its parent and have not waited): only its zombie is left,
        # as when a whole worker is killed and nobody has reaped its pool child yet.
        stat = Path(f"/proc/{child.pid}/stat")
        wait_for(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", 5,
                 "the holder to be a zombie")
        with single_flight(lock_settings):
            held = redis_client.get(key)
            assert held != dead_holder and held.decode().split("|")[1] == str(os.getpid())
            assert 0 < redis_client.pttl(key) <= lock_settings.lock_timeout_seconds * 1000
        assert redis_client.exists(key) == 0
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=5)
        if child.stdout is not None:
            child.stdout.close()


def test_a_holder_whose_pid_was_reused_counts_as_dead(
    lock_settings: Settings, redis_client: Any
) -> None:
    """A pid alone could now belong to another process (a restarted container): the
    holder is (pid, start time), and this pid's start time is not the holder's."""
    key = f"oprecon:{lock_settings.practice}:scan"
    stale = f"{socket.gethostname()}|{os.getpid()}|0|before-the-restart"
    redis_client.set(key, stale, px=60_000)
    with single_flight(lock_settings):
        assert redis_client.get(key) != stale.encode()
