"""The claim on a fix, on both state databases: one winner, a lease that lapses, a retry
that keeps its claim, a stale holder that can no longer write, and a resume tick that
re-sends only what nobody is working on.

Each test runs on SQLite (a file both threads open) and on PostgreSQL (a database of
this session, each test its own practice); threads claim through their own connections,
so the race is the databases', not Python's.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from freezegun import freeze_time
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from worker.fixes import claims
from worker.fixes.claims import Claim, NotClaimed
from worker.scan.engine import utcnow
from worker.state.db import make_engine, migrate, session_factory
from worker.state.models import ActionRow, FindingRow

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=45)
GRACE = timedelta(seconds=45)
REQUEUE = timedelta(hours=2)


class State:
    def __init__(self, sessions: sessionmaker[Session], practice: str) -> None:
        self.sessions = sessions
        self.practice = practice

    def intent(self, created: datetime = T0, **kw: Any) -> int:
        with self.sessions() as s, s.begin():
            finding = FindingRow(
                practice=self.practice, fingerprint=f"fp-{uuid.uuid4().hex[:12]}",
                check="portal_patient_email_not_dummy", severity="warning", state="fix_queued",
                first_seen_at=created, last_seen_at=created, state_changed_at=created,
            )
            s.add(finding)
            s.flush()
            action = ActionRow(
                practice=self.practice, finding_id=finding.id, kind="set_dummy_email",
                idempotency_key=f"key-{uuid.uuid4().hex}", params={"user_id": "U1"},
                status="intent", created_at=created, **kw,
            )
            s.add(action)
            s.flush()
            return action.id

    def row(self, action_id: int) -> ActionRow:
        with self.sessions() as s:
            row = s.get(ActionRow, action_id)
            assert row is not None
            return row

    def resumable(self, now: datetime | None = None) -> list[int]:
        return claims.resumable(self.sessions, self.practice, now or utcnow(), grace=GRACE,
                                requeue_after=REQUEUE)


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[State]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'claims.sqlite'}"
    else:
        url = request.getfixturevalue("pg_database")
    migrate(url)
    engine = make_engine(url)
    yield State(session_factory(engine), f"claims-{uuid.uuid4().hex[:8]}")
    engine.dispose()


def test_of_two_claims_only_the_first_wins_and_the_second_names_the_holder(
    state: State
) -> None:
    action_id = state.intent()
    first = claims.claim(state.sessions, action_id, "task-a", T0, LEASE)
    assert isinstance(first, Claim) and not first.recovering and first.attempts == 1
    second = claims.claim(state.sessions, action_id, "task-b", T0, LEASE)
    assert second == NotClaimed("claimed", "task-a")
    row = state.row(action_id)
    assert (row.status, row.claimed_by, row.lease_until) == ("applying", "task-a", T0 + LEASE)


def test_many_deliveries_racing_for_one_fix_make_one_claim(state: State) -> None:
    """Eight threads, each its own connection, released at once."""
    action_id = state.intent()
    start = threading.Barrier(8)
    results: list[Claim | NotClaimed] = []
    lock = threading.Lock()

    def deliver(owner: str) -> None:
        start.wait(timeout=10)
        got = claims.claim(state.sessions, action_id, owner, T0, LEASE)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=deliver, args=(f"task-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    won = [r for r in results if isinstance(r, Claim)]
    assert len(results) == 8 and len(won) == 1
    assert state.row(action_id).claimed_by == won[0].owner
    assert state.row(action_id).attempts == 1


def test_a_finished_fix_is_never_claimed_again(state: State) -> None:
    action_id = state.intent()
    with state.sessions() as s, s.begin():
        row = s.get(ActionRow, action_id)
        assert row is not None
        row.status = "applied"
    assert claims.claim(state.sessions, action_id, "task-a", T0, LEASE) == NotClaimed("applied")
    assert claims.claim(state.sessions, 10**9, "task-a", T0, LEASE) == NotClaimed("missing")


def test_a_lapsed_claim_without_a_call_is_taken_over_as_a_new_attempt(state: State) -> None:
    """The holder died before its portal call: the lease lapses at T0 + 45 s exactly."""
    action_id = state.intent()
    with freeze_time(T0) as clock:
        held = claims.claim(state.sessions, action_id, "task-a", utcnow(), LEASE)
        assert isinstance(held, Claim)
        clock.tick(LEASE - timedelta(seconds=1))
        assert claims.claim(state.sessions, action_id, "task-b", utcnow(), LEASE) == \
            NotClaimed("claimed", "task-a")
        clock.tick(timedelta(seconds=1))
        taken = claims.claim(state.sessions, action_id, "task-b", utcnow(), LEASE)
    assert isinstance(taken, Claim) and not taken.recovering and taken.attempts == 2
    # The dead holder's later writes change nothing.
    assert not claims.mark_called(state.sessions, held, T0, LEASE)
    assert not claims.keep_for_retry(state.sessions, held, T0, timedelta(0), LEASE, "x")
    assert state.row(action_id).claim_token == taken.token


def test_a_lapsed_claim_after_the_call_is_taken_over_to_recover_not_to_call(
    state: State
) -> None:
    action_id = state.intent()
    with freeze_time(T0) as clock:
        held = claims.claim(state.sessions, action_id, "task-a", utcnow(), LEASE)
        assert isinstance(held, Claim)
        clock.tick(timedelta(seconds=2))
        assert claims.mark_called(state.sessions, held, utcnow(), LEASE)  # renews the lease
        clock.tick(LEASE - timedelta(seconds=1))  # the renewed lease ends at T0 + 47 s
        assert claims.claim(state.sessions, action_id, "task-b", utcnow(), LEASE) == \
            NotClaimed("claimed", "task-a")
        clock.tick(timedelta(seconds=1))
        taken = claims.claim(state.sessions, action_id, "task-b", utcnow(), LEASE)
    assert isinstance(taken, Claim) and taken.recovering
    assert taken.called_at == T0 + timedelta(seconds=2)
    assert taken.attempts == 1  # recovering is not another attempt at the portal


def test_a_retry_of_the_same_task_keeps_its_claim_and_nobody_else_takes_it(
    state: State
) -> None:
    action_id = state.intent()
    with freeze_time(T0) as clock:
        held = claims.claim(state.sessions, action_id, "task-a", utcnow(), LEASE)
        assert isinstance(held, Claim)
        assert claims.keep_for_retry(state.sessions, held, utcnow(), timedelta(seconds=20),
                                     LEASE, "PortalUnavailable: 503")
        row = state.row(action_id)
        assert (row.status, row.claimed_by, row.called_at) == ("retrying", "task-a", None)
        clock.tick(timedelta(seconds=64))  # the retry is due at 20 s; held until 65 s
        assert claims.claim(state.sessions, action_id, "task-b", utcnow(), LEASE) == \
            NotClaimed("claimed", "task-a")
        again = claims.claim(state.sessions, action_id, "task-a", utcnow(), LEASE)
    assert isinstance(again, Claim) and again.attempts == 2 and not again.recovering


def test_a_retry_whose_worker_died_is_taken_over_once_its_hold_lapses(state: State) -> None:
    action_id = state.intent()
    with freeze_time(T0) as clock:
        held = claims.claim(state.sessions, action_id, "task-a", utcnow(), LEASE)
        assert isinstance(held, Claim)
        claims.keep_for_retry(state.sessions, held, utcnow(), timedelta(seconds=20), LEASE,
                              "timeout")
        clock.tick(timedelta(seconds=65))
        taken = claims.claim(state.sessions, action_id, "task-b", utcnow(), LEASE)
    assert isinstance(taken, Claim) and taken.owner == "task-b"


def test_resume_sends_only_what_nobody_is_working_on(state: State) -> None:
    """Queued, running or waiting for its own retry: left alone. Never sent (after a
    grace), claim lapsed, or sent but never picked up for two hours: sent again, once."""
    with freeze_time(T0) as clock:
        fresh = state.intent(created=utcnow())
        queued = state.intent(created=utcnow())
        claims.mark_enqueued(state.sessions, [queued], utcnow())
        running = state.intent(created=utcnow())
        claims.mark_enqueued(state.sessions, [running], utcnow())
        waiting = state.intent(created=utcnow())
        claims.mark_enqueued(state.sessions, [waiting], utcnow())
        clock.tick(timedelta(seconds=10))
        run = claims.claim(state.sessions, running, "task-r", utcnow(), LEASE)
        wait = claims.claim(state.sessions, waiting, "task-w", utcnow(), LEASE)
        assert isinstance(run, Claim) and isinstance(wait, Claim)
        claims.keep_for_retry(state.sessions, wait, utcnow(), timedelta(seconds=300), LEASE,
                              "503")
        assert state.resumable() == []

        clock.move_to(T0 + GRACE)  # the scan that committed `fresh` would have sent it
        assert state.resumable() == [fresh]
        claims.mark_enqueued(state.sessions, [fresh], utcnow())
        assert state.resumable() == []

        clock.move_to(T0 + timedelta(seconds=10) + LEASE)  # the running claim lapsed
        assert state.resumable() == [running]
        claims.mark_enqueued(state.sessions, [running], utcnow())
        assert state.resumable() == []  # sent again once, not on every tick

        clock.move_to(T0 + timedelta(seconds=10 + 300) + LEASE)  # the retry's hold lapsed
        assert state.resumable() == [waiting]
        claims.mark_enqueued(state.sessions, [waiting], utcnow())
        assert state.resumable() == []

        clock.move_to(T0 + REQUEUE + timedelta(seconds=60))
        # Sent two hours ago and never claimed since: the broker lost them.
        assert state.resumable() == [fresh, queued, running]


def test_resume_ignores_other_practices_and_finished_fixes(state: State) -> None:
    other = State(state.sessions, state.practice + "-other")
    other.intent()
    done = state.intent()
    with state.sessions() as s, s.begin():
        row = s.get(ActionRow, done)
        assert row is not None
        row.status = "applied"
    assert state.resumable(T0 + timedelta(hours=1)) == []
    with state.sessions() as s:
        assert s.scalar(select(ActionRow.status).where(ActionRow.id == done)) == "applied"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_upgrade_forgets_addresses_journaled_for_welcome_resends(
    backend: str, tmp_path: Any
) -> None:
    """Rows written before the claim revision kept the parent's email in `params`."""
    from alembic import command
    from sqlalchemy import text

    from tests.conftest import _throwaway_database
    from worker.state.db import alembic_config

    dbs = (iter([f"sqlite:///{tmp_path / 'old.sqlite'}"]) if backend == "sqlite"
           else _throwaway_database("oprecon_mig"))
    for url in dbs:
        command.upgrade(alembic_config(url), "0001")
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO findings (id, practice, fingerprint, \"check\", severity, state,"
                " cross_system, detail, first_seen_at, last_seen_at, seen_count,"
                " state_changed_at, fix_attempts) VALUES (1, 'p', 'fp', 'welcome_not_sent',"
                " 'info', 'fix_queued', true, '', :t, :t, 1, :t, 0)"), {"t": T0})
            for i, (kind, params) in enumerate([
                ("resend_welcome", '{"contact_id": "C1", "email": "ann@example.org"}'),
                ("set_dummy_email", '{"user_id": "U1", "email": "p1.u1@dummy.com"}'),
            ]):
                conn.execute(text(
                    "INSERT INTO actions (id, practice, finding_id, kind, idempotency_key,"
                    " params, status, attempts, created_at) VALUES (:i, 'p', 1, :k, :key,"
                    " :params, 'intent', 0, :t)"),
                    {"i": i + 1, "k": kind, "key": f"k{i}", "params": params, "t": T0})
        migrate(url)
        with session_factory(engine)() as s:
            params = {a.kind: a.params for a in s.scalars(select(ActionRow))}
        engine.dispose()
        from worker.model.text import address_key

        assert params == {
            "resend_welcome": {"contact_id": "C1",
                               "address": address_key("C1", " Ann@Example.org")},
            "set_dummy_email": {"user_id": "U1", "email": "p1.u1@dummy.com"},
        }
        assert "example.org" not in str(params)
