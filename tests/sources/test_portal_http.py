"""HttpPortal against the simulator over real loopback HTTP: paging, retries, errors.

No mocks: faults are real (a 503, a closed socket, a slow answer, broken JSON), armed on
the simulator for the next n requests. `sleep` records the backoff instead of waiting.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import httpx
import pytest
from portal_world import T0, portal_records

from tests.procs import wait_for
from worker.devtools.simulator import SimClock, Simulator, SimulatorServer, start_simulator
from worker.model.records import (
    WELCOME_ACTION,
    AuditEvent,
    CaregiverLink,
    InvalidRecord,
    PortalSource,
    PortalUser,
)
from worker.sources.base import PortalReader, PortalWriter
from worker.sources.portal_http import (
    HttpPortal,
    PortalLimitError,
    PortalProtocolError,
    PortalRejected,
    PortalUnavailable,
)

R = TypeVar("R")
TOKEN = "portal-test-token"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator(clock=SimClock(T0), seed=11)
    simulator.load(**portal_records())
    yield simulator
    simulator.close()


@pytest.fixture
def served(sim: Simulator) -> Iterator[tuple[SimulatorServer, str]]:
    server, url = start_simulator(sim, token=TOKEN)
    yield server, url
    server.shutdown()


@pytest.fixture
def server(served: tuple[SimulatorServer, str]) -> SimulatorServer:
    return served[0]


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def portal(served: tuple[SimulatorServer, str], sleeps: list[float]) -> Iterator[HttpPortal]:
    with HttpPortal(served[1], TOKEN, timeout=2.0, max_retries=2, page_size=2,
                    sleep=sleeps.append) as client:
        yield client


def valid(records: Iterable[R | InvalidRecord]) -> list[R]:
    """The records, asserting none was invalid (and telling mypy so)."""
    items = list(records)
    good = [r for r in items if not isinstance(r, InvalidRecord)]
    assert len(good) == len(items)
    return good


def found(user: PortalUser | None) -> PortalUser:
    assert user is not None
    return user


def requests_to(server: SimulatorServer, route: str) -> int:
    return server.request_counts().get(route, 0)


# -- reading ------------------------------------------------------------------------------


def test_is_a_portal_reader_and_writer(portal: HttpPortal) -> None:
    assert isinstance(portal, PortalReader)
    assert isinstance(portal, PortalWriter)
    assert portal.writable is True


def test_reads_every_record_page_by_page(portal: HttpPortal, server: SimulatorServer) -> None:
    data = portal_records()
    assert list(portal.users()) == data["users"]
    assert requests_to(server, "GET /users") == 3  # 2 + 2 + 1 with page_size=2
    assert list(portal.links()) == data["links"]
    assert list(portal.sources()) == data["sources"]
    assert list(portal.audit()) == data["audit"]


def test_filters_by_time_and_action(portal: HttpPortal) -> None:
    recent = [u.user_id for u in valid(portal.users(since=T0 - timedelta(days=1)))]
    assert recent == ["u-c1", "u-p1", "u-p2"]
    welcome = valid(portal.audit(since=T0 - timedelta(days=5), action=WELCOME_ACTION))
    assert [(e.user_id, e.action) for e in welcome] == [("u-c2", WELCOME_ACTION)]


def test_user_lookups(portal: HttpPortal) -> None:
    user = portal.get_user("u-p1")
    assert isinstance(user, PortalUser) and user.email == "p1@dummy.com" and user.active
    assert portal.get_user("nobody") is None
    assert list(portal.dependents("u-c1")) == [portal_records()["links"][0]]
    assert [link.caregiver_user_id for link in valid(portal.caregivers("u-p3"))] == ["u-c2"]
    with pytest.raises(PortalRejected) as err:
        list(portal.dependents("nobody"))
    assert err.value.status == 404


def test_a_bad_item_is_an_invalid_record_and_reading_goes_on(
    sim: Simulator, portal: HttpPortal
) -> None:
    rows = [
        {"user_id": "u1", "email": "a@example.org", "role": "Caregiver", "active": "true"},
        {"user_id": "u2", "email": "b@example.org", "role": "Patient", "active": "sometimes",
         "op_patient_id": "p2"},
        {"user_id": "u3", "email": "c@example.org", "role": "Patient", "active": "false",
         "updated_at": "yesterday"},
        {"user_id": "u4", "email": "d@example.org", "role": "Patient", "active": "true"},
    ]
    sim.load(users=rows)
    records = list(portal.users())
    assert [type(r).__name__ for r in records] == [
        "PortalUser", "InvalidRecord", "InvalidRecord", "PortalUser"
    ]
    bad = records[1]
    assert isinstance(bad, InvalidRecord)
    assert (bad.source, bad.line, bad.portal_user_id, bad.patient_id) == (
        "portal_users", 2, "u2", "p2"
    )
    assert "active" in bad.reason
    assert all("@" not in r.reason for r in records if isinstance(r, InvalidRecord))


def test_a_page_of_nothing_but_bad_items_is_a_protocol_error(
    sim: Simulator, served: tuple[SimulatorServer, str]
) -> None:
    sim.load(users=[{"user_id": f"u{i}", "active": "?"} for i in range(4)])
    with HttpPortal(served[1], TOKEN, page_size=3, sleep=lambda s: None) as client, \
            pytest.raises(PortalProtocolError) as err:
        list(client.users())
    assert err.value.kind == "shape" and not err.value.transient


def test_a_short_page_is_not_the_last_page(portal: HttpPortal, server: SimulatorServer) -> None:
    server.faults.add({"partial": 3})
    assert [u.user_id for u in valid(portal.users())] == ["u-c1", "u-p1", "u-p2", "u-c2", "u-p3"]
    assert requests_to(server, "GET /users") > 3


# -- retries ------------------------------------------------------------------------------


def test_429_is_retried_after_retry_after(
    portal: HttpPortal, server: SimulatorServer, sleeps: list[float]
) -> None:
    server.faults.add({"status": 429, "retry_after": 2})
    assert len(list(portal.links())) == 2
    assert sleeps == [2.0]
    assert requests_to(server, "GET /links") == 2
    assert portal.call_stats.snapshot()["by_status"] == {"429": 1, "200": 1}


def test_retry_after_is_capped(served: tuple[SimulatorServer, str], sleeps: list[float]) -> None:
    served[0].faults.add({"status": 429, "retry_after": 3600})
    with HttpPortal(served[1], TOKEN, sleep=sleeps.append, retry_after_cap=5) as client:
        assert client.get_user("u-p1") is not None
    assert sleeps == [5.0]


def test_5xx_every_time_ends_in_portal_unavailable(
    portal: HttpPortal, server: SimulatorServer, sleeps: list[float]
) -> None:
    server.faults.add({"status": 500, "count": 3})  # max_retries=2: three attempts
    with pytest.raises(PortalUnavailable) as err:
        list(portal.users())
    assert (err.value.status, err.value.kind, err.value.attempts) == (500, "server_error", 3)
    assert err.value.transient
    assert requests_to(server, "GET /users") == 3
    assert len(sleeps) == 2 and all(0 <= s <= 8 for s in sleeps)
    assert portal.call_stats.failed == 3 and portal.call_stats.retries == 2


def test_backoff_stays_within_the_budget(served: tuple[SimulatorServer, str]) -> None:
    sleeps: list[float] = []
    served[0].faults.add({"status": 503, "count": 20})
    with HttpPortal(served[1], TOKEN, max_retries=10, sleep=sleeps.append,
                    backoff_budget=3.0) as client, pytest.raises(PortalUnavailable):
        client.get_user("u-p1")
    assert sum(sleeps) <= 3.0 + 1e-9


def test_a_write_survives_a_429(
    portal: HttpPortal, server: SimulatorServer, sim: Simulator, sleeps: list[float]
) -> None:
    """A 429 says the portal did not process the request: it is sent again."""
    server.faults.add({"status": 429, "retry_after": 1, "path": "/users/u-p2"})
    portal.set_user_email("u-p2", "p2@dummy.com", "fix-1")
    assert requests_to(server, "PATCH /users/{user_id}") == 2
    assert sleeps == [1.0]
    assert sim.store.write_counts() == [
        {"endpoint": "PATCH /users/{user_id}", "key": "fix-1", "applied": 1}
    ]


@pytest.mark.parametrize("status", [500, 503])
def test_a_write_answered_5xx_is_not_sent_again_it_may_have_been_applied(
    portal: HttpPortal, server: SimulatorServer, sim: Simulator, sleeps: list[float],
    status: int,
) -> None:
    """The portal made the change, then failed while answering. Sending it again would
    lean on the portal honouring the key: one request, and the caller decides from a
    re-read (worker.fixes.apply)."""
    server.faults.add({"status": status, "applied": True, "path": "/users/u-p2"})
    with pytest.raises(PortalUnavailable) as err:
        portal.set_user_email("u-p2", "p2@dummy.com", "fix-1")
    assert err.value.in_doubt and err.value.transient
    assert (err.value.status, err.value.kind, err.value.attempts) == (
        status, "server_error", 1)
    assert f"HTTP {status} after sending; not repeated" in str(err.value)
    assert requests_to(server, "PATCH /users/{user_id}") == 1
    assert sleeps == []
    assert sim.store.write_counts() == [
        {"endpoint": "PATCH /users/{user_id}", "key": "fix-1", "applied": 1}
    ]


def test_404_on_patch_is_rejected_without_retry(
    portal: HttpPortal, server: SimulatorServer, sleeps: list[float]
) -> None:
    with pytest.raises(PortalRejected) as err:
        portal.set_user_email("gone", "secret.person@example.org", "fix-2")
    assert err.value.status == 404 and not err.value.transient
    assert "secret.person" not in str(err.value)  # ids only, never the email
    assert requests_to(server, "PATCH /users/{user_id}") == 1
    assert sleeps == []


def test_a_dropped_connection_is_retried(portal: HttpPortal, server: SimulatorServer) -> None:
    server.faults.add({"drop": 1})
    assert len(list(portal.sources())) == 3
    assert requests_to(server, "GET /sources") == 3  # two pages + one retry


def test_malformed_json_is_a_protocol_error(portal: HttpPortal, server: SimulatorServer) -> None:
    server.faults.add({"malformed": 1})
    with pytest.raises(PortalProtocolError) as err:
        list(portal.users())
    assert err.value.kind == "malformed"
    assert requests_to(server, "GET /users") == 1


def test_a_body_of_the_wrong_shape_is_a_protocol_error(
    portal: HttpPortal, server: SimulatorServer
) -> None:
    server.faults.add({"wrong_shape": 1})
    with pytest.raises(PortalProtocolError):
        list(portal.links())
    server.faults.add({"wrong_shape": 1})
    with pytest.raises(PortalProtocolError):
        portal.get_user("u-p1")


def test_slower_than_the_timeout_is_retried_then_unavailable(
    served: tuple[SimulatorServer, str],
) -> None:
    served[0].faults.add({"latency_ms": 1000, "count": 2})
    with HttpPortal(served[1], TOKEN, timeout=0.15, max_retries=1,
                    sleep=lambda s: None) as client, pytest.raises(PortalUnavailable) as err:
        client.get_user("u-p1")
    assert (err.value.kind, err.value.attempts, err.value.status) == ("timeout", 2, None)


def test_a_timed_out_write_is_not_sent_again_and_says_it_may_have_landed(
    served: tuple[SimulatorServer, str], sim: Simulator
) -> None:
    """No answer after sending: the portal may have applied it, and whether a second
    request with the same key would be ignored is the portal's business, not a promise
    we can lean on. One request; the caller decides from a re-read."""
    server, url = served
    server.faults.add({"latency_ms": 400, "path": "/users/u-p2"})
    with HttpPortal(url, TOKEN, timeout=0.15, sleep=lambda s: None) as client, \
            pytest.raises(PortalUnavailable) as err:
        client.set_user_email("u-p2", "p2@dummy.com", "fix-3")
    assert err.value.in_doubt and err.value.kind == "timeout" and err.value.attempts == 1
    # The client gave up on the slow attempt; wait until the server has finished it.
    wait_for(lambda: server.in_flight() == 0 and sim.store.pending(), 5, "the attempt served")
    assert requests_to(server, "PATCH /users/{user_id}") == 1
    assert sim.store.write_counts()[0]["applied"] == 1


def test_a_write_that_never_connected_is_retried_and_a_read_timeout_is_too(
    served: tuple[SimulatorServer, str]
) -> None:
    """Reads repeat freely; a write that could not connect never reached the portal."""
    server, url = served
    server.faults.add({"latency_ms": 400, "count": 1, "path": "/users/u-p1"})
    with HttpPortal(url, TOKEN, timeout=0.15, sleep=lambda s: None) as client:
        assert client.get_user("u-p1") is not None
    closed = start_simulator()
    closed[0].shutdown()
    with HttpPortal(closed[1], None, max_retries=2, sleep=lambda s: None) as client, \
            pytest.raises(PortalUnavailable) as err:
        client.set_user_email("u1", "u1@dummy.com", "fix-9")
    assert (err.value.kind, err.value.attempts, err.value.in_doubt) == ("connection", 3, False)


def test_token_is_required(served: tuple[SimulatorServer, str], sleeps: list[float]) -> None:
    for token in ("wrong", None):
        with HttpPortal(served[1], token, sleep=sleeps.append) as client, \
                pytest.raises(PortalRejected) as err:
            list(client.users())
        assert err.value.status == 401
    assert sleeps == []


def test_an_unreachable_portal_is_unavailable() -> None:
    server, url = start_simulator()
    server.shutdown()  # the port is now closed
    with HttpPortal(url, None, max_retries=1, sleep=lambda s: None) as client, \
            pytest.raises(PortalUnavailable) as err:
        client.get_user("u1")
    assert err.value.kind == "connection"


def test_on_call_hook_sees_every_attempt(served: tuple[SimulatorServer, str]) -> None:
    seen: list[tuple[str, str, int | None, float]] = []
    served[0].faults.add({"status": 502})
    with HttpPortal(served[1], TOKEN, sleep=lambda s: None,
                    on_call=lambda *call: seen.append(call)) as client:
        client.get_user("u-p1")
        client.get_user("nobody")
    assert [(m, r, s) for m, r, s, _ in seen] == [
        ("GET", "/users/{user_id}", 502),
        ("GET", "/users/{user_id}", 200),
        ("GET", "/users/{user_id}", 404),
    ]
    assert all(seconds >= 0 for *_, seconds in seen)


def test_a_failing_hook_does_not_fail_the_call(served: tuple[SimulatorServer, str]) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("metrics down")

    with HttpPortal(served[1], TOKEN, on_call=broken) as client:
        assert client.get_user("u-p1") is not None


# -- writing through the delay ------------------------------------------------------------


def test_email_fix_shows_only_after_the_propagation_delay(
    portal: HttpPortal, sim: Simulator
) -> None:
    portal.set_user_email("u-p2", "p2@dummy.com", "fix-4")
    sim.clock.advance(timedelta(minutes=14, seconds=59))
    assert found(portal.get_user("u-p2")).email == "max@example.org"
    sim.clock.advance(timedelta(seconds=1))
    assert found(portal.get_user("u-p2")).email == "p2@dummy.com"


def test_refresh_fixes_links_after_10_to_20_minutes(portal: HttpPortal, sim: Simulator) -> None:
    portal.refresh_source("u-c1", "fix-5")
    portal.refresh_source("u-c2", "fix-6")
    sim.clock.advance(timedelta(minutes=10) - timedelta(seconds=1))
    assert {(lk.caregiver_user_id, lk.dependent_user_id) for lk in valid(portal.links())} == {
        ("u-c1", "u-p1"), ("u-c2", "u-p3")
    }
    sim.clock.advance(timedelta(minutes=10, seconds=1))
    assert [lk.dependent_user_id for lk in valid(portal.dependents("u-c1"))] == ["u-p1", "u-p2"]
    assert list(portal.dependents("u-c2")) == []
    sources = {s.user_id: s for s in portal.sources() if isinstance(s, PortalSource)}
    assert sources["u-c2"].last_sync_at is not None and sources["u-c2"].last_sync_at > T0


def test_disconnect_and_connect_are_separate_calls(portal: HttpPortal, sim: Simulator) -> None:
    portal.disconnect_source("u-c2", "d-1")
    portal.connect_source("u-c2", "c-1")
    sim.clock.advance(timedelta(minutes=40))
    links = valid(portal.links())
    assert all(isinstance(lk, CaregiverLink) for lk in links)
    assert ("u-c2", "u-p3") not in {(lk.caregiver_user_id, lk.dependent_user_id) for lk in links}


def test_resend_welcome_shows_in_the_audit_log_after_the_delay(
    portal: HttpPortal, sim: Simulator
) -> None:
    portal.resend_welcome("c1", "ann@example.org", "welcome-c1")
    portal.resend_welcome("c1", "ann@example.org", "welcome-c1")  # a retry: applied once
    assert list(portal.audit(since=T0)) == []
    sim.clock.advance(timedelta(minutes=15))
    events = list(portal.audit(since=T0, action=WELCOME_ACTION))
    assert events == [AuditEvent(T0 + timedelta(minutes=15), WELCOME_ACTION, "u-c1",
                                 "ann@example.org")]
    assert len(list(portal.users())) == 5


def test_a_blank_idempotency_key_is_refused_locally(portal: HttpPortal) -> None:
    with pytest.raises(ValueError):
        portal.refresh_source("u-c1", " ")


def test_client_uses_an_explicit_timeout(served: tuple[SimulatorServer, str]) -> None:
    with HttpPortal(served[1], TOKEN, timeout=3.0) as client:
        assert client._timeout == httpx.Timeout(3.0, connect=3.0)


def test_a_write_cut_off_by_the_request_deadline_is_in_doubt(
    served: tuple[SimulatorServer, str], sim: Simulator
) -> None:
    """The whole-request deadline ends a write that was sent: it may still land, so the
    fix treats it like a lost answer (re-read, else hold), never as a plain failure."""
    server, url = served
    server.faults.add({"latency_ms": 1500, "path": "/users/u-p2"})
    with HttpPortal(url, TOKEN, timeout=5, request_deadline=0.3,
                    sleep=lambda s: None) as client, pytest.raises(PortalLimitError) as err:
        client.set_user_email("u-p2", "p2@dummy.com", "fix-10")
    assert err.value.in_doubt and err.value.kind == "deadline"
    wait_for(lambda: server.in_flight() == 0 and sim.store.pending(), 5, "the write served")
    assert requests_to(server, "PATCH /users/{user_id}") == 1
