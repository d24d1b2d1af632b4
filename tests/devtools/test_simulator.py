"""The portal simulator: propagation delay, refresh, idempotency, faults, loading, CLI.

Real HTTP over loopback with the server in a thread; the server's time is a `SimClock`
set by the test, so the 15-minute rule is checked to the second without waiting.
"""

from __future__ import annotations

import csv
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from freezegun import freeze_time
from portal_world import T0, portal_records

from worker.devtools.simulator import (
    PortalStore,
    SimClock,
    Simulator,
    SimulatorServer,
    start_simulator,
)
from worker.devtools.simulator.server import ROUTES
from worker.model.records import WELCOME_ACTION
from worker.sources.layout import OP_LAYOUT, PORTAL_LAYOUT

TOKEN = "sim-test-token"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator(clock=SimClock(T0), seed=7)
    simulator.load(**portal_records())
    yield simulator
    simulator.close()


@pytest.fixture
def served(sim: Simulator) -> Iterator[tuple[SimulatorServer, str]]:
    server, url = start_simulator(sim, token=TOKEN)
    yield server, url
    server.shutdown()


@pytest.fixture
def http(served: tuple[SimulatorServer, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[1], headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=5) as client:
        yield client


def emails(http: httpx.Client) -> dict[str, str]:
    return {u["user_id"]: u["email"] for u in http.get("/users").json()["items"]}


def email_in(store: PortalStore, user_id: str) -> str:
    user = store.get_user(user_id)
    assert user is not None
    return str(user["email"])


def links_of(http: httpx.Client) -> set[tuple[str, str]]:
    items = http.get("/links", params={"limit": 1000}).json()["items"]
    return {(i["caregiver_user_id"], i["dependent_user_id"]) for i in items}


# -- the propagation delay ----------------------------------------------------------------


def test_email_change_is_invisible_until_the_delay_has_passed(
    sim: Simulator, http: httpx.Client
) -> None:
    answer = http.patch("/users/u-p2", json={"email": "p2@dummy.com"},
                        headers={"Idempotency-Key": "k-email"})
    assert answer.status_code == 202
    assert answer.json()["visible_at"] == (T0 + timedelta(minutes=15)).isoformat()

    sim.clock.set(T0 + timedelta(minutes=14, seconds=59))
    assert emails(http)["u-p2"] == "max@example.org"
    assert http.get("/users/u-p2").json()["email"] == "max@example.org"

    sim.clock.set(T0 + timedelta(minutes=15))
    assert emails(http)["u-p2"] == "p2@dummy.com"
    user = http.get("/users/u-p2").json()
    assert user["updated_at"] == (T0 + timedelta(minutes=15)).isoformat()
    # An incremental read picks the change up.
    since = http.get("/users", params={"updated_since": (T0 + timedelta(minutes=1)).isoformat()})
    assert [u["user_id"] for u in since.json()["items"]] == ["u-p2"]


def test_boundary_with_freezegun_in_process() -> None:
    """The store alone (no threads, no sockets), on a real-time SimClock under freezegun."""
    simulator = Simulator(clock=SimClock(), seed=1)
    try:
        simulator.load(**portal_records())
        store = simulator.store
        with freeze_time("2024-05-01 14:00:00"):
            result = store.write("set_email", user_id="u-p2", payload={"email": "p2@dummy.com"},
                                 key="fz", fingerprint="f")
            assert result.status == 202
        with freeze_time("2024-05-01 14:14:59"):
            assert email_in(store, "u-p2") == "max@example.org"
        with freeze_time("2024-05-01 14:15:00"):
            assert email_in(store, "u-p2") == "p2@dummy.com"
    finally:
        simulator.close()


def test_clock_admin_endpoint(sim: Simulator, http: httpx.Client) -> None:
    assert http.get("/_sim/clock").json() == {"now": T0.isoformat(), "frozen": True}
    moved = http.post("/_sim/clock", json={"advance_seconds": 90}).json()
    assert moved["now"] == (T0 + timedelta(seconds=90)).isoformat()
    later = datetime(2024, 6, 1, 9, 30, tzinfo=UTC)
    assert http.post("/_sim/clock", json={"now": later.isoformat()}).json()["now"] == (
        later.isoformat()
    )
    assert sim.clock.now() == later
    running = http.post("/_sim/clock", json={"resume": True}).json()
    assert running["frozen"] is False
    assert later <= sim.clock.now() < later + timedelta(minutes=1)
    assert http.post("/_sim/clock", json={"now": "yesterday"}).status_code == 400
    assert http.post("/_sim/clock", json={"real": True}).json()["frozen"] is False


# -- source refresh -----------------------------------------------------------------------


def test_refresh_replaces_links_with_op_truth_after_10_to_20_minutes(
    sim: Simulator, http: httpx.Client
) -> None:
    for user, key in (("u-c1", "r1"), ("u-c2", "r2")):
        assert http.post(f"/users/{user}/source/refresh",
                         headers={"Idempotency-Key": key}).status_code == 202
    pending = http.get("/_sim/pending").json()["items"]
    delays = [
        datetime.fromisoformat(p["visible_at"]) - datetime.fromisoformat(p["accepted_at"])
        for p in pending
    ]
    assert len(delays) == 2
    assert all(timedelta(minutes=10) <= d <= timedelta(minutes=20) for d in delays)

    sim.clock.set(T0 + timedelta(minutes=10) - timedelta(seconds=1))
    assert links_of(http) == {("u-c1", "u-p1"), ("u-c2", "u-p3")}

    sim.clock.set(T0 + timedelta(minutes=20))
    assert links_of(http) == {("u-c1", "u-p1"), ("u-c1", "u-p2")}
    dependents = http.get("/users/u-c1/dependents").json()["items"]
    assert {d["dependent_user_id"] for d in dependents} == {"u-p1", "u-p2"}
    assert http.get("/users/u-p3/caregivers").json()["items"] == []
    sources = {s["user_id"]: s for s in http.get("/sources").json()["items"]}
    assert sources["u-c1"]["status"] == "Connected"
    assert datetime.fromisoformat(sources["u-c1"]["last_sync_at"]) > T0


def test_refresh_delay_is_deterministic_per_seed() -> None:
    def delays(seed: int) -> list[str]:
        simulator = Simulator(clock=SimClock(T0), seed=seed)
        try:
            simulator.load(**portal_records())
            for user in ("u-c1", "u-c2", "u-p1"):
                simulator.store.write("source_refresh", user_id=user, payload={},
                                      key=f"k-{user}", fingerprint=user)
            return [p["visible_at"] for p in simulator.store.pending()]
        finally:
            simulator.close()

    assert delays(3) == delays(3)
    assert delays(3) != delays(4)


def test_disconnect_then_connect_apply_in_order(sim: Simulator, http: httpx.Client) -> None:
    http.post("/users/u-c2/source/disconnect")
    http.post("/users/u-c2/source/connect")
    first, second = http.get("/_sim/pending").json()["items"]
    assert first["visible_at"] <= second["visible_at"]
    sim.clock.set(datetime.fromisoformat(first["visible_at"]))
    status = {s["user_id"]: s["status"] for s in http.get("/sources").json()["items"]}
    if first["visible_at"] != second["visible_at"]:
        assert status["u-c2"] == "Disconnected"
    sim.clock.set(datetime.fromisoformat(second["visible_at"]))
    status = {s["user_id"]: s["status"] for s in http.get("/sources").json()["items"]}
    assert status["u-c2"] == "Connected"
    assert ("u-c2", "u-p3") not in links_of(http)


# -- welcome ------------------------------------------------------------------------------


def test_welcome_records_an_audit_event_after_the_delay_and_no_user(
    sim: Simulator, http: httpx.Client
) -> None:
    body = {"op_contact_id": "c9", "email": "new.parent@example.org"}
    assert http.post("/welcome", json=body, headers={"Idempotency-Key": "w1"}).status_code == 202
    query = {"action": WELCOME_ACTION, "since": T0.isoformat()}
    assert http.get("/audit", params=query).json()["items"] == []
    sim.clock.set(T0 + timedelta(minutes=15))
    events = http.get("/audit", params=query).json()["items"]
    assert events == [{"at": (T0 + timedelta(minutes=15)).isoformat(), "action": WELCOME_ACTION,
                       "user_id": None, "email": "new.parent@example.org"}]
    assert len(http.get("/users").json()["items"]) == 5


# -- idempotency --------------------------------------------------------------------------


def test_same_idempotency_key_is_applied_once(sim: Simulator, http: httpx.Client) -> None:
    def send() -> httpx.Response:
        return http.patch("/users/u-p2", json={"email": "p2@dummy.com"},
                          headers={"Idempotency-Key": "same"})

    first, second = send(), send()
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    calls = http.get("/_sim/calls").json()
    assert calls["writes"] == [{"endpoint": "PATCH /users/{user_id}", "key": "same",
                                "applied": 1}]
    assert calls["requests"]["PATCH /users/{user_id}"] == 2
    assert len(http.get("/_sim/pending").json()["items"]) == 1


def test_idempotency_key_reused_for_another_request_is_refused(http: httpx.Client) -> None:
    http.patch("/users/u-p2", json={"email": "a@dummy.com"}, headers={"Idempotency-Key": "k"})
    other = http.patch("/users/u-p2", json={"email": "b@dummy.com"},
                       headers={"Idempotency-Key": "k"})
    assert other.status_code == 409
    assert other.json()["error"] == "idempotency_key_reused"


def test_writes_that_need_a_key_are_refused_without_one(http: httpx.Client) -> None:
    assert http.patch("/users/u-p2", json={"email": "a@dummy.com"}).status_code == 400
    assert http.post("/users/u-c1/source/refresh").status_code == 400
    assert http.post("/welcome", json={"op_contact_id": "c1", "email": "x@y.org"}).status_code \
        == 400
    assert http.patch("/users/nobody", json={"email": "a@dummy.com"},
                      headers={"Idempotency-Key": "n"}).status_code == 404
    assert http.patch("/users/u-p2", json={"email": "no-at-sign"},
                      headers={"Idempotency-Key": "n2"}).status_code == 422


# -- auth, paging errors, faults ----------------------------------------------------------


def test_bearer_token_is_required(served: tuple[SimulatorServer, str]) -> None:
    url = served[1]
    missing = httpx.get(f"{url}/users")
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert httpx.get(f"{url}/users", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(f"{url}/_sim/calls").status_code == 401
    assert httpx.get(f"{url}/_sim/health").status_code == 200
    ok = httpx.get(f"{url}/users", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200


def test_paging_and_bad_parameters(http: httpx.Client) -> None:
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = http.get("/users", params=params).json()
        seen += [u["user_id"] for u in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["u-c1", "u-p1", "u-p2", "u-c2", "u-p3"]
    assert http.get("/users", params={"cursor": "garbage!"}).status_code == 400
    links_cursor = http.get("/links", params={"limit": 1}).json()["next_cursor"]
    assert http.get("/users", params={"cursor": links_cursor}).status_code == 400
    assert http.get("/users", params={"limit": 0}).status_code == 400
    assert http.get("/audit", params={"since": "not a time"}).status_code == 400
    assert http.get("/nowhere").status_code == 404
    assert http.delete("/users").status_code == 405


def test_faults_apply_to_the_next_n_requests_then_stop(http: httpx.Client) -> None:
    armed = http.post("/_sim/faults", json={"status": 503, "count": 2, "path": "/users"})
    assert armed.json()["faults"][0]["status_left"] == 2
    assert http.get("/links").status_code == 200  # another path: untouched
    assert [http.get("/users").status_code for _ in range(3)] == [503, 503, 200]

    http.post("/_sim/faults", json={"status": 429, "retry_after": 7})
    limited = http.get("/sources")
    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "7")

    http.post("/_sim/faults", json={"malformed": 1})
    broken = http.get("/users")
    assert broken.status_code == 200
    with pytest.raises(ValueError):
        broken.json()

    http.post("/_sim/faults", json={"partial": 1})
    short = http.get("/users", params={"limit": 4}).json()
    assert len(short["items"]) == 2 and short["next_cursor"]
    rest = http.get("/users", params={"limit": 4, "cursor": short["next_cursor"]}).json()
    assert [u["user_id"] for u in rest["items"]] == ["u-p2", "u-c2", "u-p3"]

    http.post("/_sim/faults", json={"drop": 1})
    with pytest.raises(httpx.RemoteProtocolError):
        http.get("/users")
    assert http.get("/users").status_code == 200

    http.post("/_sim/faults", json={"status": 500, "count": 5})
    assert http.delete("/_sim/faults").json() == {"faults": []}
    assert http.post("/_sim/faults", json={"explode": 1}).status_code == 400


def test_latency_fault_delays_the_answer(http: httpx.Client) -> None:
    http.post("/_sim/faults", json={"latency_ms": 150})
    started = time.perf_counter()
    assert http.get("/links").status_code == 200
    assert time.perf_counter() - started >= 0.15


# -- loading ------------------------------------------------------------------------------


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_portal_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_csv(directory / "portal_users.csv", PORTAL_LAYOUT["portal_users"], [
        {"user_id": "u1", "op_contact_id": "c1", "email": "a@example.org", "role": "Caregiver",
         "active": "true", "updated_at": "2024-05-01T10:00:00+00:00"},
        {"user_id": "u2", "op_patient_id": "p1", "email": "p1@dummy.com", "role": "Patient",
         "active": "true", "updated_at": "2024-05-01T10:00:00+00:00"},
        {"user_id": "u3", "op_patient_id": "p2", "email": "p2@dummy.com", "role": "Patient",
         "active": "perhaps", "updated_at": "2024-05-01T10:00:00+00:00"},
    ])
    write_csv(directory / "portal_links.csv", PORTAL_LAYOUT["portal_links"], [])
    write_csv(directory / "portal_sources.csv", PORTAL_LAYOUT["portal_sources"],
              [{"user_id": "u1", "status": "Connected", "last_sync_at": ""}])
    write_csv(directory / "portal_audit.csv", PORTAL_LAYOUT["portal_audit"], [])
    return directory


def write_op_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_csv(directory / "patients.csv", OP_LAYOUT["patients"], [
        {"patient_id": "p1", "first_name": "K", "last_name": "L", "dob": "2015-01-01",
         "status": "Active"},
        {"patient_id": "p2", "first_name": "M", "last_name": "L", "dob": "2016-01-01",
         "status": "Active"},
    ])
    write_csv(directory / "contacts.csv", OP_LAYOUT["contacts"], [
        {"contact_id": "c1", "first_name": "A", "last_name": "L", "email": "a@example.org",
         "active": "true"},
    ])
    write_csv(directory / "family_contacts.csv", OP_LAYOUT["family_contacts"], [
        {"patient_id": "p1", "contact_id": "c1", "role_reason": "Mother", "authority": "Joint"},
        {"patient_id": "p2", "contact_id": "c1", "role_reason": "Mother", "authority": ""},
    ])
    return directory


def test_load_portal_dir_keeps_rows_as_exported_and_derives_op_truth(tmp_path: Path) -> None:
    portal = write_portal_dir(tmp_path / "portal")
    op = write_op_dir(tmp_path / "op")
    server, url = start_simulator(portal_dir=portal, op_dir=op, clock=SimClock(T0))
    try:
        with httpx.Client(base_url=url) as http:  # no token configured: open
            users = http.get("/users").json()["items"]
            assert [u["user_id"] for u in users] == ["u1", "u2", "u3"]
            assert users[2]["active"] == "perhaps"  # served as exported, for the client to flag
            assert users[0]["op_patient_id"] is None
            http.post("/users/u1/source/refresh", headers={"Idempotency-Key": "r"})
            server.simulator.clock.advance(timedelta(minutes=20))
            # Joint authority on p1 gives u1 -> u2; blank authority on p2 gives nothing.
            assert links_of(http) == {("u1", "u2")}
    finally:
        server.shutdown()


def test_expected_links_file_wins(tmp_path: Path) -> None:
    portal = write_portal_dir(tmp_path / "portal")
    write_csv(portal / "expected_links.csv", ("caregiver_user_id", "dependent_user_id"),
              [{"caregiver_user_id": "u1", "dependent_user_id": "u3"}])
    simulator = Simulator(clock=SimClock(T0))
    try:
        counts = simulator.load_portal_dir(portal, op_dir=write_op_dir(tmp_path / "op"))
        assert counts == {"portal_users": 3, "portal_links": 0, "portal_sources": 1,
                          "portal_audit": 0, "expected_links": 1}
    finally:
        simulator.close()


def test_state_persists_in_a_db_file(tmp_path: Path) -> None:
    db = tmp_path / "sim.sqlite"
    first = Simulator(db, clock=SimClock(T0))
    first.load(**portal_records())
    first.store.write("set_email", user_id="u-p2", payload={"email": "z@dummy.com"}, key="p",
                      fingerprint="f")
    first.close()
    second = Simulator(db, clock=SimClock(T0 + timedelta(hours=1)))
    try:
        assert email_in(second.store, "u-p2") == "z@dummy.com"
    finally:
        second.close()


# -- process and contract -----------------------------------------------------------------


def test_one_command_starts_the_simulator(tmp_path: Path) -> None:
    portal = write_portal_dir(tmp_path / "portal")
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.devtools.simulator", "--port", "0",
         "--portal-dir", str(portal),
         "--token", TOKEN, "--delay-minutes", "1", "--seed", "5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert found, line
        answer = httpx.get(f"{found.group(0)}/users",
                           headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        assert [u["user_id"] for u in answer.json()["items"]] == ["u1", "u2", "u3"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err


def test_shutdown_is_clean_and_idempotent() -> None:
    server, url = start_simulator()
    assert httpx.get(f"{url}/_sim/health").json() == {"ok": True}
    server.shutdown()
    server.shutdown()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/_sim/health", timeout=1)


def test_openapi_document_lists_exactly_the_served_routes() -> None:
    text = (ROOT / "worker/sources/openapi/portal.yaml").read_text()
    assert text.startswith("openapi: 3.1")
    documented: set[tuple[str, str]] = set()
    path = None
    for line in text.split("\npaths:\n", 1)[1].split("\ncomponents:\n", 1)[0].splitlines():
        if found := re.fullmatch(r"  (/\S*):", line):
            path = found.group(1)
        elif (found := re.fullmatch(r"    (get|post|patch|put|delete):", line)) and path:
            documented.add((found.group(1).upper(), path))
    served = {(r.method, r.template) for r in ROUTES if not r.template.startswith("/_sim/")}
    assert documented == served


def _readme_simulator_argv(practice: Path, db: Path) -> list[str]:
    """The simulator command exactly as README.md gives it, pointed at a test practice."""
    import shlex

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines()
                if ln.startswith("python -m worker.devtools.simulator"))
    argv = shlex.split(line.split("#", 1)[0])
    out = []
    for arg in argv:
        arg = arg.replace("X/", f"{practice}/")
        out.append(str(db) if arg.endswith(".sqlite") else arg)
    port = out.index("--port")
    out[port + 1] = "0"
    return [sys.executable, *out[1:]]


def _start(argv: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    found = re.search(r"http://127\.0\.0\.1:\d+", proc.stdout.readline())
    assert found, proc.stderr.read() if proc.stderr else ""
    return proc, found.group(0)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=10)


def test_readme_simulator_command_refreshes_links_from_op_and_keeps_fixes(
    tmp_path: Path,
) -> None:
    """Issue 16 #1: following the README must give a portal whose source refresh restores
    OP's links (--op-dir) and that remembers applied fixes across a restart (--db)."""
    write_portal_dir(tmp_path / "portal")
    write_op_dir(tmp_path / "op")
    argv = _readme_simulator_argv(tmp_path, tmp_path / "sim.sqlite")
    assert "--op-dir" in argv and "--db" in argv
    proc, url = _start(argv)
    try:
        with httpx.Client(base_url=url, timeout=5) as http:
            http.post("/_sim/clock", json={"now": T0.isoformat()})
            assert http.post("/users/u1/source/refresh",
                             headers={"Idempotency-Key": "r"}).status_code == 202
            assert http.patch("/users/u3", json={"email": "fixed@dummy.com"},
                              headers={"Idempotency-Key": "e"}).status_code == 202
            http.post("/_sim/clock", json={"advance_seconds": 21 * 60})
            assert links_of(http) == {("u1", "u2")}  # the link OP authorizes, restored
    finally:
        _stop(proc)
    proc, url = _start(argv)  # the same command again: a restart
    try:
        with httpx.Client(base_url=url, timeout=5) as http:
            http.post("/_sim/clock", json={"now": (T0 + timedelta(hours=1)).isoformat()})
            assert emails(http)["u3"] == "fixed@dummy.com"
            assert links_of(http) == {("u1", "u2")}
    finally:
        _stop(proc)
