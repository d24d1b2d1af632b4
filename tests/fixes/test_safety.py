"""The portal safety rails against a real Redis: one global token bucket, one breaker.

Time is an injected clock wherever the rule is about time (cooldown, window, refill);
one boundary also runs under freezegun, with redis-py left on real time.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from factory import MemorySource, clean_family, patient_user
from freezegun import freeze_time

from tests.conftest import REDIS_URL
from worker.fixes.apply import TransientPortalError
from worker.fixes.rails import (
    BreakerOpen,
    CircuitBreaker,
    PortalGuard,
    TokenBucket,
    kv_mirror,
    portal_guard,
)
from worker.scan.engine import Deps, reconcile
from worker.scan.planner import Decision
from worker.scan.wiring import state_sessions
from worker.state.db import kv_get

T0 = 1_780_000_000.0  # an arbitrary epoch second for the injected clocks


class Clock:
    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def breaker(client: redis.Redis, clock: Any = None,
            alerts: list[tuple[str, str]] | None = None, **kw: Any) -> CircuitBreaker:
    values: dict[str, Any] = dict(failure_ratio=0.5, min_calls=4, window_seconds=60,
                                  cooldown_seconds=30)
    values.update(kw)
    on_change = (lambda s, r: alerts.append((s, r))) if alerts is not None else None
    if clock is not None:
        values["clock"] = clock
    return CircuitBreaker(client, "t:breaker", on_change=on_change, **values)


# -- token bucket ---------------------------------------------------------------------------


def test_bucket_burst_then_refill_is_shared_by_two_clients(redis_client: redis.Redis) -> None:
    clock = Clock()
    other = redis.Redis.from_url(REDIS_URL)
    a = TokenBucket(redis_client, "t:bucket", rate_per_second=2, burst=3, clock=clock)
    b = TokenBucket(other, "t:bucket", rate_per_second=2, burst=3, clock=clock)
    try:
        assert a.try_acquire() == 0.0
        assert b.try_acquire() == 0.0
        assert a.try_acquire() == 0.0
        assert b.try_acquire() == pytest.approx(0.5)  # the burst is spent for both
        assert a.acquire(timeout=0) is False
        clock.advance(0.499)
        assert b.try_acquire() > 0
        clock.advance(0.001)
        assert b.try_acquire() == 0.0  # one token every 1/rate seconds
        assert a.try_acquire() == pytest.approx(0.5)
        clock.advance(3600)  # a long idle refills to the burst, no further
        assert [a.try_acquire() for _ in range(4)][-1] > 0
    finally:
        other.close()


def test_bucket_limits_two_workers_together_not_each(redis_client: redis.Redis) -> None:
    """Two processes' worth of clients, Redis server time: 20 tokens at 20/s with a burst
    of 1 take about a second in total; a per-worker limit would take half that."""
    took: list[bool] = []

    def worker() -> None:
        client = redis.Redis.from_url(REDIS_URL)
        bucket = TokenBucket(client, "t:global", rate_per_second=20, burst=1)
        try:
            took.extend(bucket.acquire(timeout=5) for _ in range(10))
        finally:
            client.close()

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert took == [True] * 20
    assert elapsed >= 0.9  # (20 - burst) / rate = 0.95 s, minus scheduling slack


def test_bucket_acquire_gives_up_when_the_wait_exceeds_the_timeout(
    redis_client: redis.Redis,
) -> None:
    slept: list[float] = []
    bucket = TokenBucket(redis_client, "t:slow", rate_per_second=0.5, burst=1,
                         sleep=slept.append)
    assert bucket.acquire(timeout=0.1) is True
    started = time.monotonic()
    assert bucket.acquire(timeout=0.5) is False  # the next token is 2 s away
    assert time.monotonic() - started < 0.3 and slept == []


# -- circuit breaker ------------------------------------------------------------------------


def test_breaker_opens_at_the_failure_ratio_and_alerts_once(redis_client: redis.Redis) -> None:
    clock, alerts = Clock(), []
    br = breaker(redis_client, clock, alerts)
    for ok in (True, True, False):
        assert br.before_call() == ""
        br.record(ok, None if ok else "PortalUnavailable")
    assert br.state()["state"] == "closed"  # 1 of 3: below min_calls anyway
    br.before_call()
    br.record(False, "PortalUnavailable")  # 2 of 4 failed: ratio 0.5 reached
    assert br.state()["state"] == "open"
    assert alerts == [("open", "PortalUnavailable")]
    with pytest.raises(BreakerOpen) as refused:
        br.before_call()
    assert isinstance(refused.value, TransientPortalError)  # fix tasks retry later

    # After the cooldown, one probe; it fails for the same reason: open again, no new alert.
    clock.advance(30)
    probe = br.before_call()
    assert probe and br.state()["state"] == "half_open"
    br.record(False, "PortalUnavailable", probe)
    assert br.state()["state"] == "open"
    assert alerts == [("open", "PortalUnavailable")]

    # Next probe fails for another reason: staff hear about it.
    clock.advance(30)
    probe = br.before_call()
    br.record(False, "PortalRejected", probe)
    assert alerts[-1] == ("open", "PortalRejected") and len(alerts) == 2


def test_half_open_lets_exactly_one_probe_through_then_closes(redis_client: redis.Redis) -> None:
    clock, alerts = Clock(), []
    br = breaker(redis_client, clock, alerts, min_calls=2)
    other = breaker(redis.Redis.from_url(REDIS_URL), clock, alerts)  # another worker
    for _ in range(2):
        br.before_call()
        br.record(False, "PortalUnavailable")
    clock.advance(29.9)
    with pytest.raises(BreakerOpen):
        other.before_call()
    clock.advance(0.1)
    probe = other.before_call()
    assert probe
    with pytest.raises(BreakerOpen, match="probing"):
        br.before_call()  # slow probing: one call at a time
    br.record(False, "PortalUnavailable", "")  # a straggler's outcome is not the probe's
    assert br.state()["state"] == "half_open"
    other.record(True, None, probe)
    assert br.state()["state"] == "closed"
    assert alerts == [("open", "PortalUnavailable"), ("closed", "the portal answered the "
                                                               "probe call")]
    assert br.before_call() == ""
    # A fresh window after closing: one failure does not reopen it.
    br.record(False, "PortalUnavailable")
    assert br.state()["state"] == "closed"

    # A new outage after recovery is a new incident: alerted again, same reason or not.
    br.before_call()
    br.record(False, "PortalUnavailable")
    assert br.state()["state"] == "open"
    assert alerts[-1] == ("open", "PortalUnavailable") and len(alerts) == 3


def test_failures_older_than_the_window_do_not_count(redis_client: redis.Redis) -> None:
    clock = Clock()
    br = breaker(redis_client, clock, min_calls=4, window_seconds=60)
    for _ in range(3):
        br.before_call()
        br.record(False, "PortalUnavailable")
    clock.advance(61)
    for ok in (True, True, True, False):
        br.before_call()
        br.record(ok, None if ok else "PortalUnavailable")
    assert br.state()["state"] == "closed"  # 1 of 4 in the window


def test_cooldown_boundary_under_freezegun(redis_client: redis.Redis) -> None:
    """The default clock is time.time: frozen here, while redis-py keeps real time."""
    br = breaker(redis_client, min_calls=1, cooldown_seconds=300)
    opened = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    with freeze_time(opened, ignore=["redis"]):
        br.before_call()
        br.record(False, "PortalUnavailable")
    almost = opened + timedelta(seconds=299, microseconds=999_000)
    with freeze_time(almost, ignore=["redis"]), pytest.raises(BreakerOpen):
        br.before_call()
    with freeze_time(opened + timedelta(seconds=300), ignore=["redis"]):
        assert br.before_call()
        assert br.state() == {"state": "half_open", "reason": "PortalUnavailable",
                              "since": (opened + timedelta(seconds=300)).isoformat()}


def test_a_lost_probe_frees_the_slot_after_its_lease(redis_client: redis.Redis) -> None:
    clock = Clock()
    br = breaker(redis_client, clock, min_calls=1, probe_lease_seconds=0.2)
    br.before_call()
    br.record(False, "PortalUnavailable")
    clock.advance(30)
    assert br.before_call()  # this worker dies without reporting
    with pytest.raises(BreakerOpen):
        br.before_call()
    time.sleep(0.25)  # the lease is Redis time, whatever the injected clock says
    assert br.before_call()


# -- the guard ----------------------------------------------------------------------------


def test_guard_counts_only_calls_it_let_through(redis_client: redis.Redis) -> None:
    clock, alerts = Clock(), []
    br = breaker(redis_client, clock, alerts, min_calls=1)
    bucket = TokenBucket(redis_client, "t:gbucket", rate_per_second=1, burst=1, clock=clock)
    guard = PortalGuard(bucket, br, acquire_timeout=0)
    guard.before_call()
    guard.record(False, "PortalUnavailable")
    assert br.state()["state"] == "open"
    clock.advance(30)
    assert bucket.try_acquire() == 0.0  # someone else took the only token
    # Probe granted by the breaker, but no token: the slot goes back, nothing is recorded.
    with pytest.raises(TransientPortalError, match="rate limit"):
        guard.before_call()
    guard.record(False, "TransientPortalError")  # what apply_action does next
    assert br.state()["state"] == "half_open"
    clock.advance(1)
    guard.before_call()  # the probe slot was given back: this call is the probe
    guard.record(True)
    assert br.state()["state"] == "closed"
    assert [a[0] for a in alerts] == ["open", "closed"]


def test_guard_fails_closed_when_redis_is_down() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    guard = PortalGuard(TokenBucket(dead, "k", 1, 1), breaker(dead, Clock()))
    with pytest.raises(TransientPortalError, match="guard unavailable"):
        guard.before_call()
    guard.record(True)  # never raises


# -- wiring: settings, the kv mirror and the engine's fix gate ------------------------------


def test_portal_guard_from_settings_mirrors_the_breaker_for_the_engine(
    make_settings: Any, redis_client: redis.Redis
) -> None:
    settings = make_settings(breaker_min_calls=1, breaker_cooldown_seconds=600,
                             portal_rate_per_second=50)
    sessions = state_sessions(settings)
    guard = portal_guard(settings, client=redis_client)
    guard.before_call()
    guard.record(False, "PortalUnavailable")
    assert {k.decode() for k in redis_client.keys("oprecon:test:portal:*")} >= {
        "oprecon:test:portal:bucket", "oprecon:test:portal:breaker:state"}
    with sessions() as s:
        mirrored = kv_get(s, "test", "breaker")
    assert mirrored is not None and mirrored["state"] == "open"
    assert mirrored["reason"] == "PortalUnavailable"
    until = datetime.fromisoformat(mirrored["until"])
    assert until - datetime.fromisoformat(mirrored["since"]) == timedelta(minutes=10)

    # The engine stops planning fixes while open, and plans them again after the
    # cooldown so a fix can be the probe.
    records = [patient_user("U2", "P1", email="kid@example.org")
               if getattr(r, "user_id", None) == "U2" else r for r in clean_family()]
    source = MemorySource(records)
    deps = Deps(make_settings(propagation_delay_minutes=0), sessions, source, source,
                portal_writable=True)
    check = "portal_patient_email_not_dummy"
    during = reconcile(deps, kind="full", now=until - timedelta(seconds=1))
    item = next(i for i in during.plan.items if i.finding.check == check)
    assert item.decision is Decision.ALERT and "portal is failing" in item.reason
    assert during.action_ids == []
    after = reconcile(deps, kind="full", now=until)
    item = next(i for i in after.plan.items if i.finding.check == check)
    assert item.decision is Decision.FIX and len(after.action_ids) == 1


def test_kv_mirror_failure_does_not_break_the_guard(redis_client: redis.Redis) -> None:
    def broken(_: dict[str, Any]) -> None:
        raise RuntimeError("state database down")

    br = CircuitBreaker(redis_client, "t:mirror", 0.5, 1, 60, 30, clock=Clock(), mirror=broken)
    br.before_call()
    br.record(False, "PortalUnavailable")
    assert br.state()["state"] == "open"


def test_kv_mirror_writes_the_breaker_key(make_settings: Any) -> None:
    settings = make_settings()
    sessions = state_sessions(settings)
    kv_mirror(sessions, "test")({"state": "closed", "reason": "x", "since": "now"})
    with sessions() as s:
        assert kv_get(s, "test", "breaker") == {"state": "closed", "reason": "x", "since": "now"}
