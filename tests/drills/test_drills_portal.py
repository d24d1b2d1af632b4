"""Drill: the portal misbehaving under a whole scan, and under the fixes that follow.

The HTTP client's single-call rules (reads retried on 429/5xx/timeouts/drops, writes
only when the portal surely did not take them, stop on broken JSON) are tested in
tests/sources/test_portal_http.py, the breaker's arithmetic in tests/fixes/test_safety.py.
Here the same faults hit a complete scan (worker.runtime.service.scan, as the task runs
it) of a generated practice served by the simulator, and a batch of journaled fixes
applied as the fix task applies them.

Shown: transient faults on every paged read leave the scan's findings exactly those of
the manifest; an answer that is not the API's (broken JSON, wrong shape) fails the scan
with a one-line reason recorded on its run, and does not resolve a single open finding;
fixes meeting 500s open the breaker at its threshold, after which no portal call is made;
a call answered 500 is never sent again (it may have been applied: the fix is held
`unconfirmed` for its verification), and once the portal recovers every other fix is
applied exactly once.
"""

from __future__ import annotations

import json
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
from sqlalchemy import select

from config.settings import Settings
from tests.procs import RedisServer, redis_fixture
from worker.devtools.generator import generate_practice
from worker.devtools.simulator import SimulatorServer, start_simulator
from worker.fixes.apply import TransientPortalError
from worker.runtime import service
from worker.scan.wiring import state_sessions
from worker.sources.portal_http import PortalProtocolError
from worker.state.db import kv_get
from worker.state.models import ActionRow, FindingRow, Run
from worker.state.models import FindingState as S

pytestmark = pytest.mark.services

WRITES = ("PATCH /users/{user_id}", "POST /users/{user_id}/source/refresh", "POST /welcome")


@dataclass
class Rig:
    practice_dir: Path
    sim: SimulatorServer
    url: str
    manifest: set[str]
    make: Any
    redis_url: str  # rate limit and breaker: this module's own Redis
    broker_url: str

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "practice": f"drill-portal-{uuid.uuid4().hex[:6]}",
            "redis_url": self.redis_url, "broker_url": self.broker_url,
            "op_dir": self.practice_dir / "op", "portal_source": "http", "portal_url": self.url,
            "portal_timeout_seconds": 1, "portal_max_retries": 3,
        }
        values.update(overrides)
        settings: Settings = self.make(**values)
        return settings

    def faults(self, *specs: dict[str, Any]) -> None:
        for spec in specs:
            httpx.post(f"{self.url}/_sim/faults", json=spec, timeout=5).raise_for_status()

    def requests(self) -> dict[str, int]:
        return self.sim.request_counts()

    def writes_sent(self) -> int:
        return sum(self.requests().get(route, 0) for route in WRITES)


private_redis = redis_fixture()


@pytest.fixture
def rig(tmp_path: Path, make_settings: Any, private_redis: RedisServer) -> Iterator[Rig]:
    practice_dir = tmp_path / "practice"
    generate_practice(practice_dir, patients=200, seed=5, now=datetime.now(UTC))
    manifest = {json.loads(line)["fingerprint"]
                for line in (practice_dir / "manifest.jsonl").read_text().splitlines()}
    sim, url = start_simulator(portal_dir=practice_dir / "portal", op_dir=practice_dir / "op")
    try:
        yield Rig(practice_dir, sim, url, manifest, make_settings, private_redis.url(1),
                  private_redis.url(0))
    finally:
        sim.shutdown()


def _findings(settings: Settings) -> dict[str, str]:
    with state_sessions(settings)() as s:
        rows = s.scalars(select(FindingRow).where(FindingRow.practice == settings.practice))
        return {r.fingerprint: r.state for r in rows}


def _runs(settings: Settings) -> list[Run]:
    with state_sessions(settings)() as s:
        return list(s.scalars(select(Run).where(Run.practice == settings.practice)
                              .order_by(Run.id)))


def test_transient_faults_on_every_read_are_retried_and_the_scan_is_exact(rig: Rig) -> None:
    settings = rig.settings()
    rig.faults(
        {"status": 429, "retry_after": 0.2, "path": "/users"},
        {"partial": 1, "path": "/users"},  # a short page with a cursor: not the last one
        {"latency_ms": 1500, "path": "/links"},  # slower than the 1 s timeout
        {"status": 503, "path": "/sources"},
        {"status": 500, "path": "/sources"},  # one outcome per request: the second one
        {"drop": 1, "path": "/audit"},
        {"latency_ms": 400, "path": "/audit"},  # slow, within the timeout
    )
    started = time.monotonic()
    outcome = service.scan(settings, "full")
    assert outcome.status == "succeeded"
    assert set(_findings(settings)) == rig.manifest
    assert [r.status for r in _runs(settings)] == ["succeeded"]
    counts = rig.requests()
    # One request per page, plus one per fault.
    assert (counts["GET /users"], counts["GET /links"], counts["GET /sources"],
            counts["GET /audit"]) == (3, 2, 3, 2), counts
    assert time.monotonic() - started < 15  # bounded retries, not a hang
    assert httpx.get(f"{rig.url}/_sim/faults", timeout=5).json()["faults"] == []  # all used


@pytest.mark.parametrize("fault", ["malformed", "wrong_shape"])
def test_a_broken_answer_fails_the_scan_in_one_line_and_resolves_nothing(
    rig: Rig, fault: str
) -> None:
    settings = rig.settings()
    assert service.scan(settings, "full").status == "succeeded"
    before = _findings(settings)
    assert set(before) == rig.manifest and S.RESOLVED not in before.values()

    rig.faults({fault: 1, "path": "/links"})
    with pytest.raises(PortalProtocolError) as caught:
        service.scan(settings, "full")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("portal GET /links:")
    ok, failed = _runs(settings)
    assert ok.status == "succeeded"
    assert failed.status == "failed" and failed.error == f"portal: PortalProtocolError: {message}"
    assert _findings(settings) == before  # a failed read is not "no links": nothing resolved


def test_the_cli_reports_a_broken_portal_answer_in_one_line(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.cli.main import main

    settings = rig.settings()
    for name, value in (("STATE_DB_URL", settings.state_db_url), ("PRACTICE", settings.practice),
                        ("OP_DIR", str(rig.practice_dir / "op")), ("PORTAL_SOURCE", "http"),
                        ("PORTAL_URL", rig.url), ("LOG_LEVEL", "ERROR")):
        monkeypatch.setenv(f"OPRECON_{name}", value)
    rig.faults({"malformed": 1, "path": "/users"})
    monkeypatch.setattr(sys, "argv", ["oprecon", "reconcile", "--all", "--local", "--json"])
    with pytest.raises(SystemExit) as done:
        main()
    out, err = capsys.readouterr()
    assert done.value.code == 2 and out == ""
    assert err.splitlines()[-1] == "oprecon: portal GET /users: response is not valid JSON"
    assert [r.status for r in _runs(settings)] == ["failed"]


def test_fixes_meeting_500s_open_the_breaker_then_apply_exactly_once(rig: Rig) -> None:
    settings = rig.settings(propagation_delay_minutes=0, portal_max_retries=0,
                            breaker_min_calls=3, breaker_failure_ratio=0.5,
                            breaker_cooldown_seconds=1, portal_rate_per_second=50)
    first = service.scan(settings, "full")
    ids = first.action_ids
    assert len(ids) >= 5  # enough to see the breaker stop the rest

    rig.faults({"status": 500, "count": 1000, "path": "/users/"},
               {"status": 500, "count": 1000, "path": "/welcome"})
    first: dict[int, str] = {}
    refused = []
    for action_id in ids:
        sent = rig.writes_sent()
        try:
            first[action_id] = service.apply_fix(settings, action_id, owner=f"task-{action_id}")
        except TransientPortalError as caught:
            first[action_id] = "retrying"
            assert rig.writes_sent() == sent
            refused.append(str(caught))
    # Three calls reached the failing portal. A 500 may come after the change was made,
    # so none is sent again: each fix is held unconfirmed for its verification. The
    # breaker then refused every other one without calling the portal.
    assert rig.writes_sent() == settings.breaker_min_calls
    met = sorted(i for i, outcome in first.items() if outcome == "unconfirmed")
    assert len(met) == settings.breaker_min_calls
    assert len(refused) == len(ids) - settings.breaker_min_calls
    assert all("breaker" in reason for reason in refused), refused
    with state_sessions(settings)() as s:
        assert {a.id: a.status for a in s.scalars(select(ActionRow))
                if a.practice == settings.practice and a.status != "coalesced"
                } == {i: first[i] for i in ids}

        # Mirrored where the engine reads it: no new fix is planned while it is open.
        assert (kv_get(s, settings.practice, "breaker") or {}).get("state") == "open"

    httpx.delete(f"{rig.url}/_sim/faults", timeout=5)
    time.sleep(settings.breaker_cooldown_seconds)
    # The retries (each task's own: it keeps its claim), then the same messages redelivered.
    outcomes = [service.apply_fix(settings, action_id, owner=f"task-{action_id}")
                for action_id in ids]
    outcomes += [service.apply_fix(settings, action_id, owner=f"task-{action_id}")
                 for action_id in ids]
    assert outcomes == [first[i] if i in met else "applied" for i in ids] * 2
    assert rig.writes_sent() == len(ids)  # one call per fix, the unconfirmed ones included
    writes = httpx.get(f"{rig.url}/_sim/calls", timeout=5).json()["writes"]
    with state_sessions(settings)() as s:
        keys = {a.idempotency_key for a in s.scalars(select(ActionRow))
                if a.practice == settings.practice and a.status == "applied"}
    assert len(keys) == len(ids) - len(met)
    assert {w["key"]: w["applied"] for w in writes} == dict.fromkeys(keys, 1)
