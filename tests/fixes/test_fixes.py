"""Fixes end to end: the journal, HttpPortal and the portal simulator over real HTTP.

The simulator's clock and the engine's `now` start at the same instant; advancing the
simulator's clock is how a test watches a change appear after the portal's delay.
`/_sim/calls` is the portal's own count of requests and applied writes: the proof that
a fix reached the portal exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis
from factory import caregiver, contact, fc, link, patient, patient_user, source, welcome
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import BROKER_URL
from worker.devtools.simulator import SimClock, Simulator, SimulatorServer, start_simulator
from worker.fixes.apply import TransientPortalError, apply_action
from worker.fixes.rails import portal_guard
from worker.fixes.staging import release_staged
from worker.model.findings import FixKind
from worker.model.text import address_key
from worker.runtime.dispatch import send_fixes
from worker.scan.engine import Deps, reconcile, time_rules
from worker.scan.planner import Decision
from worker.scan.wiring import state_sessions
from worker.sources.portal_http import HttpPortal
from worker.state.db import kv_get, kv_set
from worker.state.models import ActionRow, ActionStatus, FindingEvent, FindingRow

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
# A db of its own on the test Redis (OPRECON_TEST_BROKER_URL's server): the test counts
# and flushes its queue.
TEST_BROKER = BROKER_URL.rsplit("/", 1)[0] + "/13"

OP = [
    patient("P1"), contact("C1"), fc("P1", "C1"),
    patient("P2"), contact("C2"), fc("P2", "C2"),
    patient("P3"), contact("C3"), fc("P3", "C3"),
]
U2_EMAIL = "kid1@example.org"


def portal_state(*, without: str | None = None) -> dict[str, list[Any]]:
    """U2 (P1's user) has a real email; U3 (C2) lacks its link to U4 (P2); C3 has no
    user and never got a Welcome email."""
    users = [
        caregiver("U1", "C1"), patient_user("U2", "P1", email=U2_EMAIL),
        caregiver("U3", "C2"), patient_user("U4", "P2"),
    ]
    return {
        "users": [u for u in users if u.user_id != without],
        "links": [link("U1", "U2")],
        "sources": [source("U1"), source("U3")],
        "audit": [welcome("c1@example.org"), welcome("c2@example.org")],
        "expected_links": [("U1", "U2"), ("U3", "U4")],
    }


class OPSource:
    """OP as a reader over OP (the portal part comes from the simulator over HTTP)."""

    def __init__(self, records: list[Any]) -> None:
        self.records = records

    def _of(self, name: str) -> Iterator[Any]:
        return iter([r for r in self.records if type(r).__name__ == name])

    def patients(self, since: Any = None) -> Iterator[Any]:
        return self._of("Patient")

    def contacts(self, since: Any = None) -> Iterator[Any]:
        return self._of("Contact")

    def family_contacts(self, since: Any = None) -> Iterator[Any]:
        return self._of("FamilyContact")


@dataclass
class World:
    sim: Simulator
    server: SimulatorServer
    url: str
    http: httpx.Client
    settings_for: Callable[..., Any]
    op: OPSource

    def portal(self, **kw: Any) -> HttpPortal:
        kw.setdefault("max_retries", 0)
        return HttpPortal(self.url, None, sleep=lambda _: None, **kw)

    def deps(self, settings: Any, portal: HttpPortal | None = None) -> Deps:
        return Deps(settings, state_sessions(settings), self.op, portal or self.portal(),
                    portal_writable=True)

    def calls(self) -> dict[str, Any]:
        return self.http.get("/_sim/calls").json()

    def requests(self, route: str) -> int:
        return int(self.calls()["requests"].get(route, 0))

    def user(self, uid: str) -> dict[str, Any]:
        return self.http.get(f"/users/{uid}").json()

    def links(self) -> set[tuple[str, str]]:
        items = self.http.get("/links").json()["items"]
        return {(i["caregiver_user_id"], i["dependent_user_id"]) for i in items}

    def welcomes(self) -> list[str]:
        items = self.http.get("/audit", params={"action": "Profile: Welcome Mail Sent"})
        return [i["email"] for i in items.json()["items"]]


@pytest.fixture
def world(make_settings: Any, redis_client: redis.Redis) -> Iterator[World]:
    sim = Simulator(clock=SimClock(T0), seed=3)
    sim.load(**portal_state())
    server, url = start_simulator(sim)

    def settings_for(**kw: Any) -> Any:
        values: dict[str, Any] = dict(
            propagation_delay_minutes=0, portal_source="http", portal_url=url,
            mass_change_max_fixes=50, mass_change_max_percent=0, portal_rate_per_second=100,
        )
        values.update(kw)
        return make_settings(**values)

    with httpx.Client(base_url=url, timeout=5) as http:
        yield World(sim, server, url, http, settings_for, OPSource(list(OP)))
    server.shutdown()
    sim.close()


def by_kind(sessions: sessionmaker[Session]) -> dict[str, ActionRow]:
    with sessions() as s:
        return {a.kind: a for a in s.scalars(select(ActionRow))}


def finding(sessions: sessionmaker[Session], action: ActionRow) -> FindingRow:
    with sessions() as s:
        row = s.get(FindingRow, action.finding_id)
        assert row is not None
        return row


def action_row(sessions: sessionmaker[Session], action_id: int) -> ActionRow:
    with sessions() as s:
        row = s.get(ActionRow, action_id)
        assert row is not None
        return row


def at(when: datetime) -> Callable[[], datetime]:
    return lambda: when


ROUTES = {
    FixKind.SET_DUMMY_EMAIL: "PATCH /users/{user_id}",
    FixKind.REFRESH_SOURCE: "POST /users/{user_id}/source/refresh",
    FixKind.RESEND_WELCOME: "POST /welcome",
}


# -- each fix kind, once, visible after the portal's delay ----------------------------------


def test_each_fix_kind_is_applied_once_and_shows_after_the_delay(
    world: World, redis_client: redis.Redis
) -> None:
    settings = world.settings_for()
    deps = world.deps(settings)
    result = reconcile(deps, kind="full", now=T0)
    actions = by_kind(deps.sessions)
    assert set(actions) == set(ROUTES)
    assert sorted(result.action_ids) == sorted(a.id for a in actions.values())
    guard = portal_guard(settings, client=redis_client)
    for a in actions.values():
        assert apply_action(deps.sessions, deps.portal, a.id, time_rules(settings), op=deps.op,
                            guard=guard, now=at(T0)) == "applied"
        assert finding(deps.sessions, a).state == "held"

    # Accepted, not visible: the portal takes 15 minutes (10-20 for a source refresh).
    world.sim.clock.set(T0 + timedelta(minutes=9, seconds=59))
    assert ("U3", "U4") not in world.links()
    world.sim.clock.set(T0 + timedelta(minutes=14, seconds=59))
    assert world.user("U2")["email"] == U2_EMAIL
    assert "c3@example.org" not in world.welcomes()
    world.sim.clock.set(T0 + timedelta(minutes=15))
    assert world.user("U2")["email"] == actions[FixKind.SET_DUMMY_EMAIL].params["email"]
    assert world.user("U2")["email"].endswith("@dummy.com")
    assert world.welcomes().count("c3@example.org") == 1
    world.sim.clock.set(T0 + timedelta(minutes=20))
    assert ("U3", "U4") in world.links()

    # Exactly once, under the journal's idempotency keys.
    writes = world.calls()["writes"]
    assert sorted((w["endpoint"], w["key"], w["applied"]) for w in writes) == sorted(
        (ROUTES[FixKind(a.kind)], a.idempotency_key, 1) for a in actions.values()
    )

    # Applying the same actions again does not reach the portal.
    for a in actions.values():
        assert apply_action(deps.sessions, deps.portal, a.id, time_rules(settings), op=deps.op,
                            guard=guard, now=at(T0)) == "applied"
    assert [world.requests(route) for route in ROUTES.values()] == [1, 1, 1]

    # After the holds the fresh read verifies every fix: all resolved, nothing re-applied.
    after = reconcile(deps, kind="full", now=T0 + timedelta(minutes=20))
    assert after.action_ids == []
    for a in actions.values():
        assert finding(deps.sessions, a).state == "resolved"


def test_a_lost_outcome_is_not_called_again_but_held_for_verification(world: World) -> None:
    """A worker that died after the portal call: its claim lapses with the call marked;
    the next attempt re-reads (the change is not visible yet, the portal takes 15 minutes),
    does not call a second time, and holds the finding from the time of the lost call."""
    settings = world.settings_for()
    deps = world.deps(settings)
    reconcile(deps, kind="full", now=T0)
    email = by_kind(deps.sessions)[FixKind.SET_DUMMY_EMAIL]
    assert apply_action(deps.sessions, deps.portal, email.id, time_rules(settings), op=deps.op,
                        now=at(T0)) == "applied"
    with deps.sessions() as s, s.begin():  # as if the outcome had never been recorded
        row = s.get(ActionRow, email.id)
        assert row is not None
        row.status, row.applied_at = ActionStatus.APPLYING, None
        found = s.get(FindingRow, row.finding_id)
        assert found is not None and found.fix_attempts == 1
        found.state, found.fix_attempts = "fix_queued", 0
    later = T0 + timedelta(seconds=settings.fix_lease_seconds + 1)
    assert apply_action(deps.sessions, deps.portal, email.id, time_rules(settings), op=deps.op,
                        now=at(later)) == "unconfirmed"
    assert world.requests("PATCH /users/{user_id}") == 1
    held = finding(deps.sessions, email)
    assert held.state == "held" and held.next_check_at == T0 + settings.hold
    # The hold's verification decides: the change shows, the finding is resolved.
    world.sim.clock.set(T0 + timedelta(minutes=15))
    reconcile(deps, kind="full", now=T0 + timedelta(minutes=15))
    assert finding(deps.sessions, email).state == "resolved"
    assert world.requests("PATCH /users/{user_id}") == 1


def test_a_problem_that_comes_back_after_it_was_resolved_is_fixed_again(world: World) -> None:
    """A new episode of the same finding gets a new idempotency key: the old key would
    make the journal skip it and the portal replay the old answer."""
    settings = world.settings_for()
    deps = world.deps(settings)
    first = reconcile(deps, kind="full", now=T0)
    old = by_kind(deps.sessions)[FixKind.SET_DUMMY_EMAIL]
    for action_id in first.action_ids:
        apply_action(deps.sessions, deps.portal, action_id, time_rules(settings), op=deps.op,
                     now=at(T0))
    world.sim.clock.set(T0 + timedelta(minutes=20))
    reconcile(deps, kind="full", now=T0 + timedelta(minutes=20))
    assert finding(deps.sessions, old).state == "resolved"

    # Someone types a real address on the child's portal user again.
    world.sim.store.write("set_email", user_id="U2", payload={"email": U2_EMAIL},
                          key="staff-edit", fingerprint="staff-edit")
    world.sim.clock.set(T0 + timedelta(minutes=40))
    again = reconcile(deps, kind="full", now=T0 + timedelta(minutes=40))
    (action_id,) = again.action_ids
    new = action_row(deps.sessions, action_id)
    assert new.kind == FixKind.SET_DUMMY_EMAIL and new.idempotency_key != old.idempotency_key
    assert apply_action(deps.sessions, deps.portal, action_id, time_rules(settings), op=deps.op,
                        now=at(T0 + timedelta(minutes=40))) == "applied"
    keys = {w["key"] for w in world.calls()["writes"] if w["endpoint"] == ROUTES[new.kind]}
    assert keys == {old.idempotency_key, "staff-edit", new.idempotency_key}


# -- failures ---------------------------------------------------------------------------------


def test_a_429_leaves_the_action_retrying_then_a_later_attempt_applies(
    world: World, redis_client: redis.Redis
) -> None:
    """A 429 says the portal did not process the call: the fix is retried at once (by
    its own task, which keeps the claim)."""
    settings = world.settings_for()
    deps = world.deps(settings)
    reconcile(deps, kind="full", now=T0)
    email = by_kind(deps.sessions)[FixKind.SET_DUMMY_EMAIL]
    world.http.post("/_sim/faults", json={"status": 429, "retry_after": 0, "count": 1,
                                          "path": "/users/U2"})
    guard = portal_guard(settings, client=redis_client)
    with pytest.raises(TransientPortalError):
        apply_action(deps.sessions, deps.portal, email.id, time_rules(settings), op=deps.op,
                     guard=guard, now=at(T0), owner="task-1")
    row = action_row(deps.sessions, email.id)
    assert row.status == "retrying" and "PortalUnavailable" in (row.error or "")
    assert U2_EMAIL not in (row.error or "")  # ids and statuses only, never the address
    assert finding(deps.sessions, email).state == "fix_queued"
    assert redis_client.zcard("oprecon:test:portal:breaker:fail") == 1

    # Celery's retry of the same task keeps its claim.
    assert apply_action(deps.sessions, deps.portal, email.id, time_rules(settings), op=deps.op,
                        guard=guard, now=at(T0), owner="task-1") == "applied"
    assert action_row(deps.sessions, email.id).status == "applied"
    assert world.requests("PATCH /users/{user_id}") == 2  # the 429, then the real one
    assert [w["applied"] for w in world.calls()["writes"]] == [1]


@pytest.mark.parametrize(
    ("delay_minutes", "outcome"),
    [(0, "already"),  # a portal whose reads show a change at once
     (15, "unconfirmed")],  # the real portal's delay: a re-read cannot tell yet
)
def test_a_write_answered_500_after_it_was_applied_is_called_once(
    world: World, redis_client: redis.Redis, delay_minutes: int, outcome: str
) -> None:
    """The portal makes the change and then answers 500. Retrying would send it a second
    time; instead the fix re-reads: `already` when the change shows, else `unconfirmed`
    and held from the call. Celery's retry and the resume tick find it finished. One
    PATCH, counted by the portal, whatever the client's own retry setting."""
    world.sim.store.delay = timedelta(minutes=delay_minutes)
    settings = world.settings_for()
    deps = world.deps(settings, world.portal(max_retries=3))
    reconcile(deps, kind="full", now=T0)
    email = by_kind(deps.sessions)[FixKind.SET_DUMMY_EMAIL]
    world.http.post("/_sim/faults", json={"status": 500, "applied": True,
                                          "path": "/users/U2"})
    guard = portal_guard(settings, client=redis_client)
    for _ in range(2):  # the first delivery, then its redelivery (or Celery's retry)
        assert apply_action(deps.sessions, deps.portal, email.id, time_rules(settings),
                            op=deps.op, guard=guard, now=at(T0), owner="task-1") == outcome
    assert world.requests("PATCH /users/{user_id}") == 1
    assert [w["applied"] for w in world.calls()["writes"]] == [1]
    row = action_row(deps.sessions, email.id)
    assert row.error is not None and "answered HTTP 500" in row.error
    assert "not repeated" in row.error and U2_EMAIL not in row.error
    assert redis_client.zcard("oprecon:test:portal:breaker:fail") == 1  # the breaker saw it
    held = finding(deps.sessions, email)
    assert held.state == "held" and held.next_check_at == T0 + settings.hold

    # The hold's verification finds the change there: resolved, still one call.
    world.sim.clock.set(T0 + timedelta(minutes=15))
    reconcile(deps, kind="full", now=T0 + timedelta(minutes=15))
    assert finding(deps.sessions, email).state == "resolved"
    assert world.requests("PATCH /users/{user_id}") == 1


def test_a_write_answered_500_that_was_not_applied_is_retried_after_the_hold(
    world: World,
) -> None:
    """A 500 that came before the change: the re-read cannot tell it from one that came
    after, so the fix is held; the verification finds the problem still there, and the
    next scan makes a second attempt (bounded by verify_max_retries): two calls, the
    change applied once."""
    settings = world.settings_for()
    deps = world.deps(settings)
    reconcile(deps, kind="full", now=T0)
    email = by_kind(deps.sessions)[FixKind.SET_DUMMY_EMAIL]
    world.http.post("/_sim/faults", json={"status": 500, "path": "/users/U2"})
    assert apply_action(deps.sessions, deps.portal, email.id, time_rules(settings),
                        op=deps.op, now=at(T0)) == "unconfirmed"
    assert world.requests("PATCH /users/{user_id}") == 1
    assert world.calls()["writes"] == []  # the portal never took it

    later = T0 + timedelta(minutes=15)
    world.sim.clock.set(later)
    again = reconcile(deps, kind="full", now=later)
    (retry,) = [i for i in again.action_ids
                if action_row(deps.sessions, i).kind == FixKind.SET_DUMMY_EMAIL]
    assert action_row(deps.sessions, retry).idempotency_key != email.idempotency_key
    assert apply_action(deps.sessions, deps.portal, retry, time_rules(settings), op=deps.op,
                        now=at(later)) == "applied"
    assert world.requests("PATCH /users/{user_id}") == 2
    assert [w["applied"] for w in world.calls()["writes"]] == [1]


def test_a_fix_that_keeps_failing_transiently_is_given_up_and_escalated(world: World) -> None:
    """Retries are bounded: after `fix_max_attempts` the fix is failed and staff hear of
    it, instead of the resume task re-enqueueing it for ever."""
    settings = world.settings_for(fix_max_attempts=3)
    deps = world.deps(settings, world.portal(max_retries=0))
    reconcile(deps, kind="full", now=T0)
    email = by_kind(deps.sessions)[FixKind.SET_DUMMY_EMAIL]
    world.http.post("/_sim/faults", json={"status": 429, "retry_after": 0, "count": 10,
                                          "path": "/users/U2"})
    for _ in range(3):
        with pytest.raises(TransientPortalError):
            apply_action(deps.sessions, deps.portal, email.id, time_rules(settings), op=deps.op,
                         now=at(T0), max_attempts=settings.fix_max_attempts, owner="task-1")
    before = sum(world.calls()["requests"].values())
    assert apply_action(deps.sessions, deps.portal, email.id, time_rules(settings), op=deps.op,
                        now=at(T0), max_attempts=settings.fix_max_attempts,
                        owner="task-1") == "failed"
    row = action_row(deps.sessions, email.id)
    assert row.status == "failed" and row.error and row.error.startswith("gave up after 3")
    assert finding(deps.sessions, email).state == "escalated"
    # No portal call once it gave up (the /_sim/calls reads themselves count one each).
    assert sum(world.calls()["requests"].values()) == before + 1


def test_a_call_that_timed_out_is_not_repeated_but_held_and_verified(world: World) -> None:
    """The call timed out, but the portal had accepted it. Sending it again would lean on
    the portal honouring the key; instead the fix re-reads (not visible yet: the portal
    takes 15 minutes), is held from the time of the call, and the verification finds
    the change there."""
    settings = world.settings_for()
    deps = world.deps(settings, world.portal(timeout=0.3))
    reconcile(deps, kind="full", now=T0)
    email = by_kind(deps.sessions)[FixKind.SET_DUMMY_EMAIL]
    world.http.post("/_sim/faults", json={"latency_ms": 700, "count": 1, "path": "/users/U2"})
    assert apply_action(deps.sessions, deps.portal, email.id, time_rules(settings), op=deps.op,
                        now=at(T0)) == "unconfirmed"
    deadline = time.monotonic() + 5
    while not world.http.get("/_sim/pending").json()["items"]:  # the slow call lands
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert world.requests("PATCH /users/{user_id}") == 1
    held = finding(deps.sessions, email)
    assert held.state == "held" and held.next_check_at == T0 + settings.hold
    world.sim.clock.set(T0 + timedelta(minutes=15))
    reconcile(deps, kind="full", now=T0 + timedelta(minutes=15))
    assert finding(deps.sessions, email).state == "resolved"
    assert world.requests("PATCH /users/{user_id}") == 1


def test_a_404_fails_the_action_and_escalates_the_finding(world: World) -> None:
    settings = world.settings_for()
    deps = world.deps(settings)
    reconcile(deps, kind="full", now=T0)
    email = by_kind(deps.sessions)[FixKind.SET_DUMMY_EMAIL]
    world.sim.load(**portal_state(without="U2"))  # the user vanished from the portal
    assert apply_action(deps.sessions, deps.portal, email.id, time_rules(settings), op=deps.op,
                        now=at(T0)) == "failed"
    row = action_row(deps.sessions, email.id)
    assert row.status == "failed" and "404" in (row.error or "")
    assert finding(deps.sessions, email).state == "escalated"
    with deps.sessions() as s:
        cause = s.scalars(select(FindingEvent.cause).order_by(FindingEvent.id.desc())).first()
    assert cause is not None and "contact OP support" in cause


# -- the mass-change guard ------------------------------------------------------------------


def staged_world(world: World, **kw: Any) -> tuple[Any, Deps, int]:
    settings = world.settings_for(mass_change_max_fixes=2, **kw)
    deps = world.deps(settings)
    result = reconcile(deps, kind="full", now=T0)
    assert result.plan.guard_tripped and result.action_ids == []
    assert {i.decision for i in result.plan.items if i.finding.fix} == {Decision.STAGED}
    assert result.run_id is not None
    return settings, deps, result.run_id


def test_staff_see_what_a_staged_batch_holds_before_approving_it(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`oprecon fixes list` names the held run and why; `fixes show RUN` lists each fix
    with the ids of its finding (never an address); both have --json."""
    import json

    from tests.cli.test_statecli import run_cli, use_env

    settings, deps, run_id = staged_world(world)
    use_env(monkeypatch, settings)
    monkeypatch.setenv("OPRECON_PRACTICE", "test")

    code, out, _ = run_cli(monkeypatch, capsys, "fixes", "list")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith(str(run_id)))
    assert " 3 " in row and "mass-change guard" in row, out
    assert "oprecon fixes show RUN" in out

    code, out, _ = run_cli(monkeypatch, capsys, "fixes", "show", str(run_id))
    assert code == 0
    assert f"3 staged fix(es) in run {run_id}" in out
    assert "@" not in out  # ids only: neither the dummy nor a real address
    code, out, _ = run_cli(monkeypatch, capsys, "fixes", "show", str(run_id), "--json")
    fixes = [json.loads(line) for line in out.splitlines()]
    with deps.sessions() as s:
        staged = {a.id: a.kind for a in s.scalars(select(ActionRow))}
    assert {f["action_id"]: f["kind"] for f in fixes} == staged
    assert all(f["finding_state"] == "open" and f["check"] for f in fixes)

    code, _, err = run_cli(monkeypatch, capsys, "fixes", "show", str(run_id + 99))
    assert code == 2 and f"run {run_id + 99} has no staged fixes" in err
    release_staged(settings, run_id, approve=False, by="pm", sessions=deps.sessions,
                   echo=lambda _: None, now=T0)
    code, out, _ = run_cli(monkeypatch, capsys, "fixes", "list")
    assert code == 0 and "no staged fixes" in out


def test_status_shows_a_staged_batch_and_the_run_that_staged_it(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16 #4: the guard's pending batch is in `oprecon status` (where to look and
    what to do), and its run says "+3 staged", not "fixes 0"."""
    import json

    from tests.cli.test_statecli import run_cli, use_env

    settings, deps, run_id = staged_world(world)
    use_env(monkeypatch, settings)
    monkeypatch.setenv("OPRECON_PRACTICE", "test")
    code, out, _ = run_cli(monkeypatch, capsys, "status")
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("staged"))
    assert f"run {run_id}: 3 fix(es) held by the mass-change guard" in line
    assert f"oprecon fixes show {run_id}" in line
    runs = out.split("Last runs")[1].split("Schedule")[0]
    row = next(ln for ln in runs.splitlines() if ln.startswith(f"{run_id} "))
    assert "0 +3 staged" in row
    code, out, _ = run_cli(monkeypatch, capsys, "status", "--json")
    st = json.loads(out)
    assert [(b["run_id"], b["staged"]) for b in st["staged"]] == [(run_id, 3)]
    assert st["runs"][0]["fixes_staged"] == 3


def count_actions(sessions: sessionmaker[Session]) -> int:
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(ActionRow)) or 0)


def test_guard_stages_a_batch_once_alerts_once_and_approve_applies_it(
    world: World, redis_client: redis.Redis
) -> None:
    settings, deps, run_id = staged_world(world)
    with deps.sessions() as s:
        guard = kv_get(s, "test", "guard")
        statuses = {a.status for a in s.scalars(select(ActionRow))}
    assert guard is not None and guard["run_id"] == run_id and guard["staged"] == 3
    assert guard["status"] == "pending" and "mass-change guard" in guard["reason"]
    assert statuses == {"staged"}

    # The next scan finds the same batch staged: no new rows, the alert is not redone.
    again = reconcile(deps, kind="full", now=T0 + timedelta(minutes=5))
    assert again.plan.guard_tripped and again.action_ids == []
    assert count_actions(deps.sessions) == 3
    with deps.sessions() as s:
        assert kv_get(s, "test", "guard") == guard
    assert world.calls()["writes"] == []

    lines: list[str] = []
    released = release_staged(settings, run_id, approve=True, by="oncall-7", mode="local",
                              sessions=deps.sessions, echo=lines.append,
                              now=T0 + timedelta(minutes=10), op=deps.op)
    assert released == 3
    assert lines == [f"run {run_id}: approved 3 staged fix(es); applied here: 3 applied"]
    assert len(world.calls()["writes"]) == 3
    with deps.sessions() as s:
        assert {a.status for a in s.scalars(select(ActionRow))} == {"applied"}
        assert {f.state for f in s.scalars(select(FindingRow).where(FindingRow.fix.is_not(None)))
                } == {"held"}
        causes = list(s.scalars(select(FindingEvent.cause)))
        assert sum("approved by oncall-7" in c for c in causes) == 3
        assert kv_get(s, "test", "guard")["status"] == "approved"  # type: ignore[index]
    # Approving twice is harmless.
    assert release_staged(settings, run_id, approve=True, mode="local",
                          sessions=deps.sessions, echo=lines.append) == 0
    assert lines[-1] == f"run {run_id}: no staged fixes to approve"


def test_approving_a_staged_batch_makes_one_refresh_per_portal_user(world: World) -> None:
    """C2 is authorized on P2 and P4 and their user U3 is linked to neither child: two
    findings, one refresh of U3 in a scan. Staged by the guard and approved by staff, the
    batch makes the same one call, and both findings are held and verified with it."""
    state = portal_state()
    state["users"] += [patient_user("U5", "P4")]
    state["expected_links"] += [("U3", "U5")]
    world.sim.load(**state)
    world.op.records += [patient("P4"), fc("P4", "C2")]
    settings, deps, run_id = staged_world(world)
    with deps.sessions() as s:
        refreshes = list(s.scalars(select(ActionRow).where(
            ActionRow.kind == FixKind.REFRESH_SOURCE).order_by(ActionRow.id)))
    assert [a.status for a in refreshes] == ["staged", "staged"]

    lines: list[str] = []
    assert release_staged(settings, run_id, approve=True, by="oncall-7", mode="local",
                          sessions=deps.sessions, echo=lines.append, now=T0,
                          op=deps.op) == 4
    assert lines == [f"run {run_id}: approved 4 staged fix(es); 1 served by another fix for "
                     "the same portal user (one call per user); applied here: 3 applied"]
    assert world.requests(ROUTES[FixKind.REFRESH_SOURCE]) == 1
    primary, follower = (action_row(deps.sessions, a.id) for a in refreshes)
    assert (primary.status, follower.status) == ("applied", "coalesced")
    assert follower.coalesced_into == primary.id
    first, second = finding(deps.sessions, primary), finding(deps.sessions, follower)
    assert first.state == second.state == "held"
    assert first.next_check_at == second.next_check_at == T0 + timedelta(minutes=20)
    with deps.sessions() as s:
        causes = list(s.scalars(select(FindingEvent.cause).where(
            FindingEvent.finding_id == follower.finding_id)))
    assert any("approved by oncall-7" in c and f"served by fix {primary.id}" in c
               for c in causes), causes

    world.sim.clock.set(T0 + timedelta(minutes=20))
    reconcile(deps, kind="full", now=T0 + timedelta(minutes=20))
    assert finding(deps.sessions, primary).state == "resolved"
    assert finding(deps.sessions, follower).state == "resolved"
    assert world.requests(ROUTES[FixKind.REFRESH_SOURCE]) == 1


def test_reject_drops_the_batch_and_leaves_the_findings_open(world: World) -> None:
    settings, deps, run_id = staged_world(world)
    lines: list[str] = []
    assert release_staged(settings, run_id, approve=False, by="oncall-7",
                          sessions=deps.sessions, echo=lines.append, now=T0) == 3
    assert "rejected 3 staged fix(es)" in lines[0]
    assert world.calls()["writes"] == []
    with deps.sessions() as s:
        assert {a.status for a in s.scalars(select(ActionRow))} == {"rejected"}
        fixable = select(FindingRow).where(FindingRow.fix.is_not(None))
        assert {f.state for f in s.scalars(fixable)} == {"open"}
        assert kv_get(s, "test", "guard")["status"] == "rejected"  # type: ignore[index]
    # Rejected stays rejected: the next scan neither stages nor applies them again.
    reconcile(deps, kind="full", now=T0 + timedelta(minutes=5))
    assert count_actions(deps.sessions) == 3


def test_approve_queues_the_fixes_on_the_worker_queue(world: World) -> None:
    broker = redis.Redis.from_url(TEST_BROKER)
    broker.flushdb()
    try:
        settings, deps, run_id = staged_world(world, broker_url=TEST_BROKER)
        lines: list[str] = []
        assert release_staged(settings, run_id, approve=True, mode="queue",
                              sessions=deps.sessions, echo=lines.append, now=T0,
                              enqueue=send_fixes) == 3
        assert "queued on the worker's fix queue" in lines[0]
        assert broker.llen("fix") == 3
        with deps.sessions() as s:
            assert {a.status for a in s.scalars(select(ActionRow))} == {"intent"}
        assert world.calls()["writes"] == []  # the worker applies them, not the CLI
    finally:
        broker.flushdb()
        broker.close()


def test_approve_falls_back_to_applying_here_when_the_broker_is_down(world: World) -> None:
    settings, deps, run_id = staged_world(world, broker_url="redis://127.0.0.1:1/0")
    lines: list[str] = []
    assert release_staged(settings, run_id, approve=True, sessions=deps.sessions,
                          echo=lines.append, now=T0, enqueue=send_fixes, op=deps.op) == 3
    assert lines[0].endswith("applied here: 3 applied")
    assert len(world.calls()["writes"]) == 3


# -- switches: pause, dry_run, per-check policies -------------------------------------------


def fixable_decisions(result: Any) -> dict[str, tuple[Decision, str]]:
    return {i.finding.check: (i.decision, i.reason) for i in result.plan.items if i.finding.fix}


def test_pause_stops_fixes_while_detection_goes_on(world: World) -> None:
    settings = world.settings_for()
    deps = world.deps(settings)
    with deps.sessions() as s, s.begin():
        kv_set(s, "test", "paused", {"paused": True, "reason": "maintenance",
                                     "at": T0.isoformat()}, T0)
    paused = reconcile(deps, kind="full", now=T0)
    assert paused.action_ids == [] and count_actions(deps.sessions) == 0
    assert {d for d, _ in fixable_decisions(paused).values()} == {Decision.ALERT}
    assert all("paused" in r for _, r in fixable_decisions(paused).values())
    with deps.sessions() as s:
        assert int(s.scalar(select(func.count()).select_from(FindingRow)) or 0) == 3

    with deps.sessions() as s, s.begin():
        kv_set(s, "test", "paused", {"paused": False, "reason": "resumed",
                                     "at": T0.isoformat()}, T0)
    resumed = reconcile(deps, kind="full", now=T0 + timedelta(minutes=1))
    assert len(resumed.action_ids) == 3
    assert world.calls()["writes"] == []  # planning is not applying


def test_dry_run_setting_is_detect_only(world: World) -> None:
    deps = world.deps(world.settings_for(dry_run=True))
    result = reconcile(deps, kind="full", now=T0)
    assert result.action_ids == [] and count_actions(deps.sessions) == 0
    assert all(d is Decision.ALERT and "detect-only" in r
               for d, r in fixable_decisions(result).values())


def test_per_check_policies(world: World) -> None:
    settings = world.settings_for(policies={"welcome_not_sent": "off",
                                            "caregiver_link_missing": "alert"})
    deps = world.deps(settings)
    result = reconcile(deps, kind="full", now=T0)
    decisions = {c: d for c, (d, _) in fixable_decisions(result).items()}
    assert decisions == {"welcome_not_sent": Decision.OFF,
                         "caregiver_link_missing": Decision.ALERT,
                         "portal_patient_email_not_dummy": Decision.FIX}
    assert set(by_kind(deps.sessions)) == {FixKind.SET_DUMMY_EMAIL}


# -- the Welcome email: once per window, valid addresses only --------------------------------


def only_c3(world: World, *op_records: Any) -> None:
    """A practice of C3's family alone: OP holds `op_records`, and the portal none of the
    other families' accounts (they would point at records OP no longer has)."""
    world.op.records = list(op_records)
    world.sim.load(audit=portal_state()["audit"], expected_links=[])


def test_welcome_is_resent_at_most_once_per_window(world: World) -> None:
    settings = world.settings_for(welcome_window_days=7, hold_minutes=15)
    deps = world.deps(settings)
    only_c3(world, *[r for r in OP if getattr(r, "patient_id", None) == "P3"
                     or getattr(r, "contact_id", None) == "C3"])
    first = reconcile(deps, kind="full", now=T0)
    (action_id,) = first.action_ids
    assert apply_action(deps.sessions, deps.portal, action_id, time_rules(settings), op=deps.op,
                        now=at(T0)) == "applied"
    # The hold ends before the portal shows the email (its clock stays at T0): the finding
    # is still there, but the contact had a resend within the window: alert, no resend.
    later = T0 + timedelta(minutes=16)
    retry = reconcile(deps, kind="full", now=later)
    decision, reason = fixable_decisions(retry)["welcome_not_sent"]
    assert decision is Decision.ALERT and "already resent" in reason
    assert retry.action_ids == []
    assert world.requests("POST /welcome") == 1

    # Once the window has passed (and still no Welcome email shows), one more resend.
    after_window = T0 + timedelta(days=7, minutes=1)
    again = reconcile(deps, kind="full", now=after_window)
    assert fixable_decisions(again)["welcome_not_sent"][0] is Decision.FIX
    assert len(again.action_ids) == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_new_email_address_gets_its_own_resend_within_the_window(
    world: World, backend: str, request: pytest.FixtureRequest
) -> None:
    """The guide: a resend "is especially helpful if they have a new email address". The
    once-per-window rule is per contact *and* address: a parent who gave a new address
    after the first resend gets one more, at the new address; the same address does not."""
    settings = world.settings_for(welcome_window_days=7, hold_minutes=15)
    deps = world.deps(settings)
    if backend == "postgresql":
        deps.sessions = request.getfixturevalue("pg_sessions")
    only_c3(world, patient("P3"), contact("C3"), fc("P3", "C3"))
    first = reconcile(deps, kind="full", now=T0)
    (action_id,) = first.action_ids
    assert apply_action(deps.sessions, deps.portal, action_id, time_rules(settings), op=deps.op,
                        now=at(T0)) == "applied"

    # The parent calls: the Welcome email never arrived, they use another address now.
    # The front desk corrects it in OP (not yet registered: still no portal account).
    moved = T0 + timedelta(minutes=16)
    world.op.records = [patient("P3"), contact("C3", email="new.c3@example.net",
                                               updated_at=T0 + timedelta(minutes=1)),
                        fc("P3", "C3")]
    second = reconcile(deps, kind="full", now=moved)
    decision, reason = fixable_decisions(second)["welcome_not_sent"]
    assert decision is Decision.FIX, reason
    (resend,) = second.action_ids
    assert apply_action(deps.sessions, deps.portal, resend, time_rules(settings), op=deps.op,
                        now=at(moved)) == "applied"
    assert world.requests("POST /welcome") == 2

    # The new address now had its resend too: within the window (and before the portal
    # shows it), no third one.
    third = reconcile(deps, kind="full", now=moved + timedelta(minutes=31))
    decision, reason = fixable_decisions(third)["welcome_not_sent"]
    assert decision is Decision.ALERT and "already resent to this address" in reason
    assert third.action_ids == []
    assert world.requests("POST /welcome") == 2
    world.sim.clock.advance(timedelta(minutes=20))
    assert world.welcomes().count("new.c3@example.net") == 1
    assert world.welcomes().count("c3@example.org") == 1


def test_no_resend_to_an_address_that_failed_validation(world: World) -> None:
    deps = world.deps(world.settings_for())
    only_c3(world, patient("P3"), contact("C3", email="c3@@example"), fc("P3", "C3"))
    result = reconcile(deps, kind="full", now=T0)
    checks = {i.finding.check for i in result.plan.items}
    assert "welcome_not_sent" not in checks
    assert "contact_email_invalid" in checks  # staff are told instead
    assert result.action_ids == []


# -- a lost outcome, without the portal's idempotency ---------------------------------------


def _die_after_calling(deps: Deps, action: ActionRow, settings: Any) -> None:
    """What a worker does up to its death: claim, mark the call, call the portal; the
    outcome is never recorded."""
    from worker.fixes import claims

    got = claims.claim(deps.sessions, action.id, "task-that-died", T0, settings.fix_lease)
    assert isinstance(got, claims.Claim)
    assert claims.mark_called(deps.sessions, got, T0, settings.fix_lease)
    portal: Any = deps.portal
    if action.kind == FixKind.REFRESH_SOURCE:
        portal.refresh_source(action.params["user_id"], idempotency_key=action.idempotency_key)
    else:
        portal.resend_welcome(action.params["contact_id"], "c3@example.org",
                              idempotency_key=action.idempotency_key)


@pytest.mark.parametrize("kind", [FixKind.REFRESH_SOURCE, FixKind.RESEND_WELCOME])
def test_a_call_lost_with_its_worker_is_not_repeated_where_the_portal_cannot_tell(
    world: World, kind: FixKind
) -> None:
    """A source refresh leaves nothing to read back, and a Welcome email reaches the
    audit log only after the portal's delay: the next attempt does not call again (the
    portal may or may not honour the key) but holds the finding from the lost call's
    time; the hold's verification then finds the problem gone."""
    settings = world.settings_for()
    deps = world.deps(settings)
    reconcile(deps, kind="full", now=T0)
    action = by_kind(deps.sessions)[kind]
    _die_after_calling(deps, action, settings)
    later = T0 + settings.fix_lease + timedelta(seconds=1)
    assert apply_action(deps.sessions, deps.portal, action.id, time_rules(settings),
                        op=deps.op, now=at(later), owner="task-resumed") == "unconfirmed"
    assert world.requests(ROUTES[kind]) == 1
    held = finding(deps.sessions, action)
    assert held.state == "held"
    assert held.next_check_at == T0 + time_rules(settings).hold_for(kind, 1)
    row = action_row(deps.sessions, action.id)
    assert row.status == "unconfirmed" and "not repeated" in (row.error or "")
    # A second delivery of the same fix later changes nothing either.
    assert apply_action(deps.sessions, deps.portal, action.id, time_rules(settings),
                        op=deps.op, now=at(later)) == "unconfirmed"

    world.sim.clock.set(T0 + timedelta(minutes=20))
    verify = reconcile(deps, kind="full", now=T0 + timedelta(minutes=20))
    assert finding(deps.sessions, action).state == "resolved"
    assert kind not in {action_row(deps.sessions, i).kind for i in verify.action_ids}
    assert world.requests(ROUTES[kind]) == 1


# -- one source refresh per portal user -------------------------------------------------------


def test_one_source_refresh_serves_every_finding_of_its_user(world: World) -> None:
    """C2 is authorized on P2 and P4; their caregiver user U3 is linked to neither child.
    The guide's step is one Disconnect + Connect of U3's source, which resyncs all of
    U3's links: one call, and one hold covering both findings. A third link found during
    that hold (P5 authorized for C2 after the refresh) rides on the same hold."""
    state = portal_state()
    state["users"] += [patient_user("U5", "P4"), patient_user("U6", "P5")]
    state["expected_links"] += [("U3", "U5"), ("U3", "U6")]
    world.sim.load(**state)
    world.op.records += [patient("P4"), fc("P4", "C2"), patient("P5")]
    settings = world.settings_for()
    deps = world.deps(settings)
    result = reconcile(deps, kind="full", now=T0)
    with deps.sessions() as s:
        refreshes = list(s.scalars(select(ActionRow).where(
            ActionRow.kind == FixKind.REFRESH_SOURCE).order_by(ActionRow.id)))
    primary, follower = refreshes
    assert (primary.status, follower.status) == ("intent", "coalesced")
    assert follower.coalesced_into == primary.id and follower.id not in result.action_ids
    for action_id in result.action_ids:
        apply_action(deps.sessions, deps.portal, action_id, time_rules(settings), op=deps.op,
                     now=at(T0))
    assert world.requests(ROUTES[FixKind.REFRESH_SOURCE]) == 1
    first, second = finding(deps.sessions, primary), finding(deps.sessions, follower)
    assert first.state == second.state == "held"
    assert first.next_check_at == second.next_check_at == T0 + timedelta(minutes=20)

    world.op.records.append(fc("P5", "C2"))
    during = reconcile(deps, kind="full", now=T0 + timedelta(minutes=5))
    assert during.action_ids == []
    with deps.sessions() as s:
        third = s.scalars(select(ActionRow).where(ActionRow.kind == FixKind.REFRESH_SOURCE)
                          .order_by(ActionRow.id.desc())).first()
    assert third is not None and third.id != follower.id
    assert (third.status, third.coalesced_into) == ("coalesced", primary.id)
    assert finding(deps.sessions, third).next_check_at == T0 + timedelta(minutes=20)

    world.sim.clock.set(T0 + timedelta(minutes=20))
    after = reconcile(deps, kind="full", now=T0 + timedelta(minutes=20))
    assert {finding(deps.sessions, a).state for a in (primary, follower, third)} == {"resolved"}
    assert after.action_ids == []
    assert world.requests(ROUTES[FixKind.REFRESH_SOURCE]) == 1


# -- the Welcome resend's address: read from OP when it is sent -----------------------------


def test_a_welcome_resend_keeps_ids_only_and_sends_to_the_address_op_has_now(
    world: World
) -> None:
    """The journal holds no parent's address. A parent who gives the front desk a new
    address before the resend goes out gets it at the new one (the guide: a resend "is
    especially helpful if they have a new email address")."""
    import json

    settings = world.settings_for()
    deps = world.deps(settings)
    reconcile(deps, kind="full", now=T0)
    action = by_kind(deps.sessions)[FixKind.RESEND_WELCOME]
    assert action.params == {"patient_id": None, "contact_id": "C3", "user_id": None,
                             "address": address_key("C3", "c3@example.org")}
    with deps.sessions() as s:
        journal = json.dumps([a.params for a in s.scalars(select(ActionRow))])
    assert "c3@example.org" not in journal and "@example.org" not in journal

    world.op.records = [contact("C3", email="c3.new@example.org") if getattr(r, "contact_id",
                        None) == "C3" and type(r).__name__ == "Contact" else r
                        for r in world.op.records]
    assert apply_action(deps.sessions, deps.portal, action.id, time_rules(settings),
                        op=deps.op, now=at(T0)) == "applied"
    # The journal now keys the address actually sent (for the once-per-address rule).
    assert action_row(deps.sessions, action.id).params["address"] == address_key(
        "C3", "c3.new@example.org")
    world.sim.clock.set(T0 + timedelta(minutes=15))
    assert "c3.new@example.org" in world.welcomes()
    assert "c3@example.org" not in world.welcomes()


def test_no_welcome_is_sent_when_op_no_longer_has_a_valid_address(world: World) -> None:
    settings = world.settings_for()
    deps = world.deps(settings)
    reconcile(deps, kind="full", now=T0)
    action = by_kind(deps.sessions)[FixKind.RESEND_WELCOME]
    world.op.records = [contact("C3", email="not-an-address") if getattr(r, "contact_id",
                        None) == "C3" and type(r).__name__ == "Contact" else r
                        for r in world.op.records]
    assert apply_action(deps.sessions, deps.portal, action.id, time_rules(settings),
                        op=deps.op, now=at(T0)) == "unavailable"
    assert world.requests(ROUTES[FixKind.RESEND_WELCOME]) == 0
    assert finding(deps.sessions, action).state == "open"


def test_when_the_refresh_s_own_finding_goes_away_the_others_still_get_one(
    world: World
) -> None:
    """The finding a coalesced refresh was planned for resolved before it ran: the
    findings riding on it are not stranded — one of them becomes the call, and the resume
    tick sends it."""
    from worker.fixes.claims import resumable

    state = portal_state()
    state["users"] += [patient_user("U5", "P4")]
    state["expected_links"] += [("U3", "U5")]
    world.sim.load(**state)
    world.op.records += [patient("P4"), fc("P4", "C2")]
    settings = world.settings_for()
    deps = world.deps(settings)
    reconcile(deps, kind="full", now=T0)
    with deps.sessions() as s, s.begin():
        primary, follower = s.scalars(select(ActionRow).where(
            ActionRow.kind == FixKind.REFRESH_SOURCE).order_by(ActionRow.id)).all()
        own = s.get(FindingRow, primary.finding_id)
        assert own is not None
        own.state = "resolved"
    assert apply_action(deps.sessions, deps.portal, primary.id, time_rules(settings),
                        op=deps.op, now=at(T0)) == "already"
    heir = action_row(deps.sessions, follower.id)
    assert (heir.status, heir.coalesced_into) == ("intent", None)
    later = T0 + settings.fix_lease
    assert follower.id in resumable(deps.sessions, settings.practice, later,
                                    grace=settings.fix_lease, requeue_after=timedelta(hours=2))
    assert apply_action(deps.sessions, deps.portal, follower.id, time_rules(settings),
                        op=deps.op, now=at(later)) == "applied"
    assert world.requests(ROUTES[FixKind.REFRESH_SOURCE]) == 1
    assert finding(deps.sessions, follower).state == "held"
