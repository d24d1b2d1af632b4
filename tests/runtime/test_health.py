"""Heartbeats, the per-process docker healthcheck, the dead-man's switch and the metrics.

Time rules are tested with freezegun on the pure parts (heartbeat file ages, the switch);
Redis and the state database are real.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time

from worker.runtime import health, metrics
from worker.runtime.health import Check, Heartbeat
from worker.state.db import kv_get, kv_set

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


class FakeRedis:
    """Stands in for Redis where only the file matters (inside freeze_time)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def set(self, key: str, value: str, ex: int | None = None) -> None:
        self.data[key] = (value, ex)

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            *args: str) -> tuple[int, str, str]:
    from worker.cli.main import main

    monkeypatch.setattr(sys, "argv", ["oprecon", *args])
    with pytest.raises(SystemExit) as done:
        main()
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


# -- heartbeat files: the docker healthcheck ------------------------------------------------


def test_worker_heartbeat_is_fresh_up_to_exactly_three_intervals(make_settings: Any) -> None:
    settings = make_settings(heartbeat_interval_seconds=10)
    hb = Heartbeat(settings, "worker", "celery@host", client=FakeRedis())  # type: ignore[arg-type]
    with freeze_time(T0):
        hb.mark_ready()
    assert health.ready_file(settings).exists()
    with freeze_time(T0 + timedelta(seconds=30)):
        check = health.process_check(settings, "worker")
        assert check.ok, check.detail
        assert check.data["age_seconds"] == 30
    with freeze_time(T0 + timedelta(seconds=30, microseconds=1000)):
        check = health.process_check(settings, "worker")
        assert not check.ok
        assert "stale" in check.detail


def test_worker_alive_but_not_ready_is_not_healthy(make_settings: Any) -> None:
    settings = make_settings()
    hb = Heartbeat(settings, "worker", "celery@host", client=FakeRedis())  # type: ignore[arg-type]
    with freeze_time(T0):
        hb.beat()
        check = health.process_check(settings, "worker")
    assert not check.ok and "not ready" in check.detail
    with freeze_time(T0):
        hb.mark_ready()
        assert health.process_check(settings, "worker").ok
    hb.stop()  # a clean stop drops readiness at once
    with freeze_time(T0):
        assert not health.process_check(settings, "worker").ok


def test_missing_or_garbled_heartbeat_file_is_unhealthy(make_settings: Any) -> None:
    settings = make_settings()
    assert not health.process_check(settings, "beat").ok
    path = health.heartbeat_file(settings, "beat")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json", encoding="utf-8")
    check = health.process_check(settings, "beat")
    assert not check.ok and "no heartbeat" in check.detail


def test_standby_beat_is_healthy_for_its_container(make_settings: Any) -> None:
    settings = make_settings(heartbeat_interval_seconds=5)
    hb = Heartbeat(settings, "beat", "host:1", client=FakeRedis())  # type: ignore[arg-type]
    with freeze_time(T0):
        hb.beat(role="standby")
    with freeze_time(T0 + timedelta(seconds=15)):
        check = health.process_check(settings, "beat")
    assert check.ok and "standby" in check.detail
    with freeze_time(T0 + timedelta(seconds=16)):
        assert not health.process_check(settings, "beat").ok


def test_beat_stops_stamping_when_its_loop_stops_ticking() -> None:
    # Loop interval 30 s, heartbeat 10 s: up to 70 s without a tick is still alive.
    assert health.beat_loop_alive(True, 100.0, 170.0, 30, 10)
    assert not health.beat_loop_alive(True, 100.0, 170.1, 30, 10)
    assert health.beat_loop_alive(False, None, 10_000.0, 30, 10)  # standby: waiting is fine
    assert health.beat_loop_alive(True, None, 10_000.0, 30, 10)  # just took the lock


def test_beat_heartbeat_thread_reports_role(make_settings: Any) -> None:
    settings = make_settings(heartbeat_interval_seconds=0.05)
    state = {"active": False}
    beat = health.BeatHeartbeat(settings, lambda: (state["active"], None), 30)
    beat.heartbeat._client = FakeRedis()  # type: ignore[assignment]
    beat._tick()
    assert health.read_stamp(health.heartbeat_file(settings, "beat"))["role"] == "standby"
    state["active"] = True
    beat._tick()
    assert health.read_stamp(health.heartbeat_file(settings, "beat"))["role"] == "active"
    beat.stop()


@pytest.mark.services
def test_heartbeat_key_in_redis_has_the_stale_ttl_and_goes_on_stop(
    make_settings: Any, redis_client: Any
) -> None:
    settings = make_settings(heartbeat_interval_seconds=4)
    hb = Heartbeat(settings, "worker", "celery@h1")
    hb.mark_ready()
    key = f"oprecon:{settings.practice}:heartbeat:worker:celery@h1"
    assert hb.key == key
    assert json.loads(redis_client.get(key))["ready"] is True
    assert 0 < redis_client.ttl(key) <= 12
    hb.stop()
    assert redis_client.get(key) is None


def test_heartbeat_survives_redis_being_down(make_settings: Any, tmp_path: Path) -> None:
    settings = make_settings(redis_url="redis://127.0.0.1:1/0")
    hb = Heartbeat(settings, "worker", "celery@h1")
    hb.beat()  # logs once, never raises
    hb.beat()
    assert health.read_stamp(health.heartbeat_file(settings, "worker")) is not None


# -- cluster view ----------------------------------------------------------------------------


def _stamp(process: str, ident: str, at: datetime, **kw: Any) -> dict[str, Any]:
    return {"process": process, "id": ident, "at": at.isoformat(), **kw}


def test_heartbeat_checks_need_a_ready_worker_and_exactly_one_active_beat(
    make_settings: Any,
) -> None:
    settings = make_settings(heartbeat_interval_seconds=10)
    now = T0
    old = now - timedelta(seconds=31)
    beats = [
        _stamp("worker", "celery@a", now, ready=True),
        _stamp("worker", "celery@b", old, ready=True),  # stale: ignored
        _stamp("beat", "h:1", now, role="active"),
        _stamp("beat", "h:2", now, role="standby"),
    ]
    worker, beat = health.heartbeat_checks(settings, beats, now)
    assert worker.ok and worker.data["ready"] == 1 and worker.data["ids"] == ["celery@a"]
    assert beat.ok and beat.data == {"active": 1, "standby": 1, "ids": ["h:1", "h:2"]}

    worker, beat = health.heartbeat_checks(
        settings, [_stamp("worker", "celery@a", now, ready=False),
                   _stamp("beat", "h:2", now, role="standby")], now)
    assert not worker.ok and not beat.ok
    assert "no active beat" in beat.detail

    _, beat = health.heartbeat_checks(
        settings, [_stamp("beat", "h:1", now, role="active"),
                   _stamp("beat", "h:3", now, role="active")], now)
    assert not beat.ok and "twice" in beat.detail


# -- the dead-man's switch ---------------------------------------------------------------------


def _sessions(settings: Any) -> Any:
    from worker.scan.wiring import state_sessions

    return state_sessions(settings)


def test_deadman_trips_only_past_exactly_two_intervals(make_settings: Any) -> None:
    settings = make_settings(incremental_scan_minutes=5)
    sessions = _sessions(settings)
    success = {"at": T0.isoformat(), "run_id": 7, "kind": "incremental"}
    with sessions.begin() as s:
        kv_set(s, settings.practice, "last_success", success, T0)

    at_limit = health.run_deadman(settings, sessions, T0 + timedelta(minutes=10))
    assert at_limit["overdue"] is False and at_limit["alerted"] is False
    assert health.deadman_check(settings, success, None, T0 + timedelta(minutes=10)).ok

    late = T0 + timedelta(minutes=10, seconds=1)
    value = health.run_deadman(settings, sessions, late)
    assert value["overdue"] is True
    assert value["alerted"] is False
    assert value["at"] == late.isoformat()
    assert value["age_seconds"] == 601
    assert value["last_success_run_id"] == 7
    assert not health.deadman_check(settings, success, None, late).ok
    with sessions() as s:
        assert kv_get(s, settings.practice, "deadman")["overdue"] is True


def test_deadman_alerts_once_per_episode_and_records_recovery(make_settings: Any) -> None:
    settings = make_settings(incremental_scan_minutes=5)
    sessions = _sessions(settings)
    with sessions.begin() as s:
        kv_set(s, settings.practice, "last_success", {"at": T0.isoformat(), "run_id": 1}, T0)
    first = health.run_deadman(settings, sessions, T0 + timedelta(minutes=11))
    # The notifier (digest track) tells staff and flips `alerted`.
    with sessions.begin() as s:
        kv_set(s, settings.practice, "deadman", {**first, "alerted": True}, T0)
    again = health.run_deadman(settings, sessions, T0 + timedelta(minutes=21))
    assert again["overdue"] and again["alerted"] is True and again["at"] == first["at"]

    back = T0 + timedelta(minutes=22)
    with sessions.begin() as s:
        kv_set(s, settings.practice, "last_success", {"at": back.isoformat(), "run_id": 2}, back)
    ok = health.run_deadman(settings, sessions, back + timedelta(seconds=5))
    assert ok["overdue"] is False and ok["alerted"] is False
    assert ok["recovered_at"] == (back + timedelta(seconds=5)).isoformat()


def test_deadman_without_any_success_counts_from_when_it_was_armed(make_settings: Any) -> None:
    settings = make_settings(incremental_scan_minutes=5)
    sessions = _sessions(settings)
    armed = health.run_deadman(settings, sessions, T0)
    assert armed["overdue"] is False and armed["armed_at"] == T0.isoformat()
    # A fresh deployment before the switch is armed: not unhealthy (issue 16 #8).
    fresh = health.deadman_check(settings, None, None, T0)
    assert fresh.ok and fresh.detail.startswith("no scan has finished yet")
    waiting = health.deadman_check(settings, None, armed, T0 + timedelta(minutes=10))
    assert waiting.detail.startswith("waiting for the first scan (switch armed 10m00s ago)")
    assert health.deadman_check(settings, None, armed, T0 + timedelta(minutes=10)).ok
    later = health.run_deadman(settings, sessions, T0 + timedelta(minutes=10, seconds=1))
    assert later["overdue"] is True and later["last_success_at"] is None


def test_a_database_only_the_demo_scanned_is_not_watched_until_a_worker_arms_the_switch(
    make_settings: Any
) -> None:
    """`oprecon demo` scans its own database and stops; nothing watches it, so its last
    run is reported as such, not as an outage. Once a worker's switch is armed on that
    database, the demo's run counts like any other."""
    settings = make_settings(incremental_scan_minutes=5)
    demo = {"at": T0.isoformat(), "run_id": 3, "kind": "demo"}
    hour_later = T0 + timedelta(hours=1)
    quiet = health.deadman_check(settings, demo, None, hour_later)
    assert quiet.ok and quiet.data["demo"] is True
    assert quiet.detail == ("last successful demo run (run 3) 1h00m ago; the dead-man's "
                            "switch is not armed: only `oprecon demo` has scanned this "
                            "database")
    armed = {"armed_at": hour_later.isoformat(), "overdue": False}
    assert not health.deadman_check(settings, demo, armed, hour_later).ok


@pytest.mark.services
def test_cluster_health_with_live_heartbeats_and_a_recent_scan(
    make_settings: Any, redis_client: Any, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    demo = Path(__file__).resolve().parents[2] / "worker" / "devtools" / "demo_practice"
    settings = make_settings(incremental_scan_minutes=5, op_dir=demo / "op",
                             portal_dir=demo / "portal")
    sessions = _sessions(settings)
    now = datetime.now(UTC)
    with sessions.begin() as s:
        kv_set(s, settings.practice, "last_success",
               {"at": (now - timedelta(minutes=3)).isoformat(), "run_id": 3,
                "kind": "incremental"}, now)
    w = Heartbeat(settings, "worker", "celery@w1")
    w.mark_ready()
    b = Heartbeat(settings, "beat", "host:9")
    b.beat(role="active")

    checks = {c.name: c for c in health.cluster_checks(settings)}
    assert all(c.ok for c in checks.values()), [c.detail for c in checks.values()]
    assert set(checks) == {"redis", "broker", "state db", "worker", "beat", "op source",
                           "portal", "fixes", "last scan"}

    for key, value in {"OPRECON_STATE_DB_URL": settings.state_db_url,
                       "OPRECON_REDIS_URL": settings.redis_url,
                       "OPRECON_BROKER_URL": settings.broker_url,
                       "OPRECON_PRACTICE": settings.practice,
                       "OPRECON_OP_DIR": str(settings.op_dir),
                       "OPRECON_PORTAL_DIR": str(settings.portal_dir),
                       "OPRECON_HEARTBEAT_DIR": str(settings.heartbeat_dir)}.items():
        monkeypatch.setenv(key, value)
    code, out, _ = run_cli(monkeypatch, capsys, "health")
    assert code == 0 and out.strip().endswith("healthy")
    code, out, _ = run_cli(monkeypatch, capsys, "health", "--json")
    report = json.loads(out)
    assert code == 0 and report["healthy"] is True
    code, out, _ = run_cli(monkeypatch, capsys, "health", "--process", "worker")
    assert code == 0, out
    code, out, err = run_cli(monkeypatch, capsys, "health", "--process", "flower")
    assert code == 2 and err.count("\n") == 1

    b.stop()  # beat gone → unhealthy, exit 1
    code, out, _ = run_cli(monkeypatch, capsys, "health")
    assert code == 1 and "unhealthy: beat" in out
    w.stop()


def test_cluster_health_reports_unreachable_parts_without_crashing(make_settings: Any) -> None:
    settings = make_settings(redis_url="redis://127.0.0.1:1/0",
                             broker_url="redis://:hunter2@127.0.0.1:1/1")
    checks = {c.name: c for c in health.cluster_checks(settings)}
    assert not checks["redis"].ok and not checks["broker"].ok
    assert "hunter2" not in checks["broker"].detail and "***" in checks["broker"].detail
    assert not checks["state db"].ok  # no SQLite file yet: health never creates one
    assert not checks["worker"].ok and not checks["last scan"].ok


def test_mask_url_hides_passwords_only() -> None:
    assert health.mask_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert (health.mask_url("postgresql+psycopg://oprecon:pw@db:5432/oprecon")
            == "postgresql+psycopg://oprecon:***@db:5432/oprecon")
    assert health.mask_url("sqlite:///var/oprecon.sqlite") == "sqlite:///var/oprecon.sqlite"


def test_check_json_shape() -> None:
    assert Check("worker", True, "fine", {"ready": 1}).to_json() == {
        "name": "worker", "ok": True, "detail": "fine", "ready": 1}


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_hooks_use_low_cardinality_labels_without_phi() -> None:
    metrics.scan_finished("incremental", "succeeded", 0.2)
    metrics.scan_finished("incremental", "skipped", 0.0)
    metrics.run_recorded([("welcome_not_sent", "info"), ("welcome_not_sent", "info")],
                         full_scope=True, success_at=T0)
    metrics.fix_finished("set_dummy_email", "applied")
    metrics.portal_call("GET", "/users/{user_id}", 200, 0.05)
    metrics.portal_call("POST", "/users/{user_id}/source/refresh", None, 10.0)
    values = scrape(metrics.render().decode())
    assert values[("oprecon_scans_total", (("kind", "incremental"), ("status", "succeeded")))] >= 1
    assert ("oprecon_scan_duration_seconds_count", (("kind", "incremental"),)) in values
    assert values[("oprecon_findings", (("check", "welcome_not_sent"), ("severity", "info")))] == 2
    assert values[("oprecon_findings", (("check", "caregiver_link_stale"),
                                        ("severity", "high")))] == 0
    assert values[("oprecon_last_success_timestamp_seconds", ())] == T0.timestamp()
    assert values[("oprecon_fixes_total", (("kind", "set_dummy_email"),
                                           ("outcome", "applied")))] >= 1
    assert values[("oprecon_portal_errors_total",
                   (("method", "POST"), ("route", "/users/{user_id}/source/refresh")))] >= 1
    statuses = {dict(labels).get("status") for name, labels in values
                if name == "oprecon_portal_calls_total"}
    assert {"2xx", "error"} <= statuses
    label_values = {v for _, labels in values for _, v in labels}
    assert all("@" not in v for v in label_values)


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text → {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_watch_portal_attaches_the_hook_once() -> None:
    class Portal:
        on_call = None

    p = Portal()
    metrics.watch_portal(p)
    assert p.on_call is metrics.portal_call

    def mine(*_: Any) -> None:
        return None

    q = Portal()
    q.on_call = mine  # type: ignore[assignment]
    metrics.watch_portal(q)
    assert q.on_call is mine
    metrics.watch_portal(object())  # adapters without the hook are left alone
