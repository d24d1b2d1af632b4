"""Issue 18 at the service level, on real Redis and both state databases: fair waiting
for the scan lock, family runs that never wait behind a practice scan's read and whose
newer result a practice scan from an older read leaves alone, `skipped` run rows, the
deferred nightly full scan (its deadline under freezegun), and the shared portal read
rate limit. The same claims with real worker processes are in test_scheduling.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from portal_world import T0, portal_records
from procs import wait_for
from sqlalchemy import select

from config.settings import Settings
from tests.factory import MemorySource, clean_family, contact, fc, patient
from worker.devtools.simulator import SimClock, Simulator, start_simulator
from worker.runtime import deferral, service
from worker.scan.engine import Deps, ScopeRequest, read_snapshot, reconcile
from worker.scan.locks import (
    ScanBusy,
    StaleRead,
    family_write,
    practice_write,
    scan_lock,
    single_flight,
)
from worker.sources.portal_http import HttpPortal
from worker.state.db import kv_get, make_engine, migrate, session_factory
from worker.state.models import FindingRow, Run
from worker.state.models import FindingState as S

NOW = datetime(2026, 3, 2, 2, 15, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.sqlite'}"
        migrate(url)
        engine = make_engine(url)
        yield session_factory(engine)
        engine.dispose()
    else:
        yield request.getfixturevalue("pg_sessions")


@pytest.fixture
def settings(make_settings: Any, redis_client: Any) -> Settings:
    """Settings on the test Redis (flushed around each test)."""
    return make_settings(propagation_delay_minutes=0)


def _deps(settings: Settings, sessions: Any, records: list[object]) -> Deps:
    source = MemorySource(records)
    return Deps(settings, sessions, source, source)


def _runs(deps: Deps) -> list[Run]:
    with deps.sessions() as s:
        return list(s.scalars(select(Run).order_by(Run.id)))


# -- fair waiting -------------------------------------------------------------------------


def test_a_waiting_run_is_not_overtaken_by_a_newly_started_scan(settings: Settings) -> None:
    """Issue 18: waiters polled every 0.1 s while a new task tried at once, so one waited
    103 s of its 120. Now the lock goes to the queued waiter, whoever asks after it."""
    holder = scan_lock(settings)
    assert holder.acquire(blocking=False)
    got: list[str] = []

    def waiter() -> None:
        with single_flight(settings, wait_seconds=20):
            got.append("waiter")
            time.sleep(0.3)

    thread = threading.Thread(target=waiter)
    thread.start()
    queue = f"oprecon:{settings.practice}:scan:queue"
    wait_for(lambda: holder.redis.zcard(queue) == 1, 10, "the waiter in the queue")
    holder.release()
    # A periodic scan arriving right as the lock frees: it must not jump the queue.
    with pytest.raises(ScanBusy), single_flight(settings, wait_seconds=0):
        got.append("newcomer")
    thread.join(timeout=20)
    assert got == ["waiter"]
    with single_flight(settings, wait_seconds=0):  # and once the waiter is done, it is free
        pass


def test_a_dead_waiter_does_not_block_the_queue(settings: Settings) -> None:
    lock = scan_lock(settings)
    lock.redis.zadd(f"{lock.name}:queue", {"gone|1|1|x": 1})  # no liveness key: dead
    with single_flight(settings, wait_seconds=0):
        pass


# -- the state write lock and fences -------------------------------------------------------


def test_fences_order_family_and_practice_writes(settings: Settings) -> None:
    with practice_write(settings, 100.0, wait_seconds=1) as ceded:
        assert not ceded
    # A family read older than the committed practice read must read again.
    with pytest.raises(StaleRead), family_write(settings, 50.0, frozenset({"P1"}),
                                                 frozenset(), frozenset(), wait_seconds=1):
        pass
    with family_write(settings, 150.0, frozenset({"P1"}), frozenset({"C1"}),
                      frozenset({"U1"}), wait_seconds=1):
        pass
    # A practice scan that read before the family run leaves the family alone...
    with practice_write(settings, 120.0, wait_seconds=1) as ceded:
        assert ceded is not None
        assert (ceded.patients, ceded.contacts, ceded.users) == ({"P1"}, {"C1"}, {"U1"})
    # ...one that read after it does not.
    with practice_write(settings, 200.0, wait_seconds=1) as ceded:
        assert not ceded


@pytest.mark.parametrize("late", ["full scan", "shard"])
def test_a_practice_scan_from_an_older_read_leaves_a_newer_family_result_alone(
    settings: Settings, sessions: Any, late: str
) -> None:
    """The on-call run saw the chart fixed and resolved its finding; a full scan (or one
    shard of a sharded nightly scan: no practice lock, but the same write section) that
    had read the practice before the fix commits afterwards: it must not reopen it."""
    from worker.scan import shards

    before = clean_family() + [patient("P2", email="kid@example.org"), contact("C2"),
                               fc("P2", "C2")]
    deps = _deps(settings, sessions, before)
    first = service.scan(settings, "full", deps=deps, now=NOW)
    assert first.status == "succeeded"
    assert "patient_email_present" in first.result.plan.by_check()  # type: ignore[union-attr]

    read_at = time.time()
    old_snapshot = read_snapshot(deps.op, deps.portal)  # the long scan's read, before the fix
    time.sleep(0.01)
    fixed = clean_family() + [patient("P2"), contact("C2"), fc("P2", "C2")]
    fixed_deps = _deps(settings, sessions, fixed)
    on_call = service.scan(settings, "adhoc", ScopeRequest("patient", "P2"), deps=fixed_deps,
                           now=NOW + timedelta(minutes=1))
    assert on_call.status == "succeeded" and on_call.result is not None
    assert on_call.result.sync.resolved == 1

    def section() -> Any:
        return practice_write(settings, read_at, wait_seconds=5)

    later = NOW + timedelta(minutes=2)
    if late == "shard":  # it reads `deps`, the practice as it was before the fix
        result = shards.run_shard(deps, shards.start(deps, 1, now=later), 0, 1, now=later,
                                  write_section=section)
    else:
        result = reconcile(deps, ScopeRequest(), kind="full", now=later,
                           snapshot=old_snapshot, write_section=section)
    assert any("on-call runs that read them after this scan did" in t for t in result.trace)
    with deps.sessions() as s:
        row = s.scalar(select(FindingRow).where(FindingRow.check == "patient_email_present"))
        assert row is not None and row.state == S.RESOLVED


def test_an_on_call_run_does_not_wait_for_a_practice_scan(
    settings: Settings, sessions: Any
) -> None:
    """The practice lock is held (a full scan reading): a `--patient` run completes."""
    deps = _deps(settings, sessions, clean_family())
    lock = scan_lock(settings)
    assert lock.acquire(blocking=False)
    try:
        started = time.monotonic()
        outcome = service.scan(settings, "adhoc", ScopeRequest("patient", "P1"), deps=deps,
                               wait_seconds=120, now=NOW)
        assert outcome.status == "succeeded"
        assert time.monotonic() - started < 10
    finally:
        lock.release()
    assert outcome.result is not None and outcome.result.rows_read is not None


# -- skipped runs and the deferred full scan ------------------------------------------------


def test_a_skipped_scan_leaves_a_run_row_with_reason_and_holder(
    settings: Settings, sessions: Any
) -> None:
    deps = _deps(settings, sessions, clean_family())
    lock = scan_lock(settings)
    assert lock.acquire(blocking=False, token=b"hostA|4242|99|abc")
    try:
        outcome = service.scan(settings, "incremental", deps=deps, now=NOW, task_id="t-inc")
    finally:
        lock.release()
    assert outcome.status == "skipped"
    (run,) = _runs(deps)
    assert (run.kind, run.status, run.task_id) == ("incremental", "skipped", "t-inc")
    assert run.error is not None and "another scan" in run.error and "hostA pid 4242" in run.error
    assert run.summary == {"skipped": {"reason": outcome.reason, "holder": "hostA pid 4242"}}


def test_a_skipped_nightly_full_scan_is_run_by_the_next_scheduled_scan(
    settings: Settings, sessions: Any
) -> None:
    deps = _deps(settings, sessions, clean_family())
    lock = scan_lock(settings)
    assert lock.acquire(blocking=False)
    try:
        skipped = service.scan(settings, "full", deps=deps, now=NOW)
        again = service.scan(settings, "incremental", deps=deps, now=NOW + timedelta(minutes=1))
    finally:
        lock.release()
    assert skipped.status == again.status == "skipped"
    with deps.sessions() as s:
        owed = kv_get(s, settings.practice, deferral.KEY)
    assert owed is not None and owed["attempts"] == 1
    assert owed["deadline"] == (NOW + timedelta(hours=4)).isoformat()

    ran = service.scan(settings, "incremental", deps=deps, now=NOW + timedelta(minutes=2))
    assert ran.status == "succeeded" and ran.result is not None
    assert ran.result.kind == "full" and ran.result.scope.is_all
    with deps.sessions() as s:
        assert kv_get(s, settings.practice, deferral.KEY) is None
    assert [(r.kind, r.status) for r in _runs(deps)] == [
        ("full", "skipped"), ("incremental", "skipped"), ("full", "succeeded")]


def test_a_deferred_full_scan_past_its_deadline_alerts_once(
    settings: Settings, sessions: Any
) -> None:
    with freeze_time(NOW):
        deferral.defer(sessions, settings, NOW, "another scan is running", "hostA pid 1")
    with freeze_time(NOW + timedelta(hours=3, minutes=59)):
        owed = deferral.check_deadline(sessions, settings, NOW + timedelta(hours=3, minutes=59))
        assert owed is not None and "alerted_at" not in owed
    late = NOW + timedelta(hours=4, minutes=1)
    with freeze_time(late):
        owed = deferral.check_deadline(sessions, settings, late)
        assert owed is not None and owed["alerted_at"] == late.isoformat()
    with freeze_time(late + timedelta(minutes=10)):
        again = deferral.check_deadline(sessions, settings, late + timedelta(minutes=10))
        assert again is not None and again["alerted_at"] == late.isoformat()  # once
    deferral.clear(sessions, settings)
    assert deferral.check_deadline(sessions, settings, late) is None


# -- the portal read rate limit -------------------------------------------------------------


def test_portal_reads_share_one_rate_limit_across_clients(
    make_settings: Any, redis_client: Any
) -> None:
    """Two workers' clients, 30 reads at 10/s with a burst of 10: at least 2 s, whoever
    reads (before, nothing throttled reads: ~11,000 in a burst in the drill)."""
    from worker.fixes.rails import throttle_reads

    settings = make_settings(portal_read_rate_per_second=10)
    sim = Simulator(clock=SimClock(T0), seed=3)
    sim.load(**portal_records())
    server, url = start_simulator(sim, token="t")
    clients = [HttpPortal(url, "t", timeout=5, max_retries=0) for _ in range(2)]
    try:
        for client in clients:
            throttle_reads(settings, client)
        started = time.monotonic()
        for n in range(30):
            assert clients[n % 2].get_user("u-c1") is not None
        assert time.monotonic() - started >= 1.9
        assert sum(c.call_stats.ok for c in clients) == 30
    finally:
        for client in clients:
            client.close()
        server.shutdown()
        sim.close()
