"""A worker killed with SIGKILL in the middle of a batch leaves nothing half done.

A real child process applies 20 journaled fixes one by one against the simulator, each
call slowed by the simulator's latency fault; the test kills it while a call is in
flight (the portal has the request, the child has no answer), then runs the resume path
once the dead child's claim has lapsed (`claims.resumable` + `apply_action`) and asks
the portal how often it was called: once per fix, the in-flight one included — it is
not called again but held for verification, since the portal does not show it yet.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from factory import patient, patient_user
from sqlalchemy import select

from worker.devtools.simulator import SimClock, Simulator, start_simulator
from worker.fixes.apply import apply_action
from worker.fixes.claims import resumable
from worker.scan.engine import Deps, reconcile, time_rules
from worker.scan.wiring import state_sessions
from worker.sources.portal_http import HttpPortal
from worker.state.models import ActionRow, FindingRow

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
N = 20
PATCH = "PATCH /users/{user_id}"

CHILD = textwrap.dedent(
    """
    import sys
    from datetime import timedelta
    from worker.fixes.apply import apply_action
    from worker.fixes.claims import resumable
    from worker.scan.engine import utcnow
    from worker.scan.lifecycle import TimeRules
    from worker.sources.portal_http import HttpPortal
    from worker.state.db import make_engine, session_factory

    db_url, portal_url, practice = sys.argv[1:4]
    sessions = session_factory(make_engine(db_url))
    portal = HttpPortal(portal_url, None, timeout=10, max_retries=0)
    for action_id in resumable(sessions, practice, utcnow(), grace=timedelta(0),
                               requeue_after=timedelta(hours=2)):
        print("start", action_id, flush=True)
        apply_action(sessions, portal, action_id, TimeRules())
        print("done", action_id, flush=True)
    print("finished", flush=True)
    """
)


class OP:
    def __init__(self) -> None:
        self.records = [patient(f"P{i:02d}") for i in range(N)]

    def patients(self, since: Any = None) -> Any:
        return iter(self.records)

    def contacts(self, since: Any = None) -> Any:
        return iter(())

    def family_contacts(self, since: Any = None) -> Any:
        return iter(())


def test_sigkill_mid_batch_then_resume_applies_every_fix_exactly_once(
    make_settings: Any, tmp_path: Path
) -> None:
    sim = Simulator(clock=SimClock(T0))
    sim.load(users=[patient_user(f"U{i:02d}", f"P{i:02d}", email=f"kid{i}@example.org")
                    for i in range(N)])
    server, url = start_simulator(sim)
    settings = make_settings(propagation_delay_minutes=0, mass_change_max_fixes=100,
                             mass_change_max_percent=0)
    sessions = state_sessions(settings)  # a file-based SQLite both processes share
    portal = HttpPortal(url, None, max_retries=0)
    http = httpx.Client(base_url=url, timeout=5)
    child: subprocess.Popen[str] | None = None
    try:
        result = reconcile(Deps(settings, sessions, OP(), portal, portal_writable=True),
                           kind="full", now=T0)
        assert len(result.action_ids) == N
        http.post("/_sim/faults", json={"latency_ms": 250, "count": N, "path": "/users/"})

        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, settings.state_db_url, url, settings.practice],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        # Kill once a few fixes are done and the portal holds a request it has not
        # answered: the child dies between its call and recording the outcome.
        deadline = time.monotonic() + 20
        while True:
            assert time.monotonic() < deadline, "the child never got going"
            assert child.poll() is None, "the child finished before it could be killed"
            calls = http.get("/_sim/calls").json()
            sent = calls["requests"].get(PATCH, 0)
            if sent >= 6 and sent > len(calls["writes"]):
                break
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert child.returncode == -signal.SIGKILL
        assert child.stdout is not None
        done = [line for line in child.stdout.read().splitlines() if line.startswith("done")]
        assert 5 <= len(done) < N

        # The killed call still lands in the portal (it had the request); wait for it.
        while len(http.get("/_sim/calls").json()["writes"]) < sent:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        http.delete("/_sim/faults")

        def resume(at: datetime) -> list[int]:
            return resumable(sessions, settings.practice, at, grace=settings.fix_lease,
                             requeue_after=timedelta(hours=2))

        now = datetime.now(UTC)
        left = resume(now)
        assert len(left) == N - len(done) - 1  # the in-flight one is still claimed
        later = now + settings.fix_lease + timedelta(seconds=1)
        left = resume(later)
        assert len(left) == N - len(done)  # its claim has lapsed: taken back
        outcomes = [apply_action(sessions, portal, action_id, time_rules(settings),
                                 now=lambda: later) for action_id in left]
        assert resume(later) == []
        assert sorted(outcomes) == ["applied"] * (N - len(done) - 1) + ["unconfirmed"]

        with sessions() as s:
            actions = list(s.scalars(select(ActionRow)))
            held = set(s.scalars(select(FindingRow.state)))
        assert len(actions) == N
        assert held == {"held"}
        calls = http.get("/_sim/calls").json()
        applied = {w["key"]: w["applied"] for w in calls["writes"] if w["endpoint"] == PATCH}
        assert applied == {a.idempotency_key: 1 for a in actions}
        # Every fix reached the portal exactly once: the in-flight one was not sent again.
        assert calls["requests"][PATCH] == N
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        if child is not None and child.stdout is not None:
            child.stdout.close()
        http.close()
        portal.close()
        server.shutdown()
        sim.close()
