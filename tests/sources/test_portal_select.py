"""Targeted reads over the portal HTTP API (HttpPortal.select_*, the list endpoints' id
selectors in worker/sources/openapi/portal.yaml, served by the simulator).

They must answer exactly what PortalTables' select_* answer on the same data, so an
incremental scan over HTTP leaves the findings a full scan leaves, while reading only the
changed neighbourhood instead of paging through every portal user, link and source.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

import tests.scan.test_incremental as inc
from worker.devtools.generator import generate_practice
from worker.devtools.simulator import SimClock, Simulator, SimulatorServer, start_simulator
from worker.model.records import CaregiverLink, InvalidRecord, PortalSource, PortalUser
from worker.scan.incremental import full_reconcile, incremental_reconcile
from worker.sources.csv_source import CsvOPSource, CsvPortalSource
from worker.sources.portal_http import HttpPortal, PortalRejected

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SELECTED = ("/users", "/links", "/sources")


@dataclass
class Seen:
    """One GET the client sent: its path, query and how many items came back."""

    path: str
    params: dict[str, list[str]]
    items: int


@dataclass
class Recorder(httpx.BaseTransport):
    """A real transport that notes every GET list request and the size of its page."""

    inner: httpx.BaseTransport = field(default_factory=httpx.HTTPTransport)
    seen: list[Seen] = field(default_factory=list)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        content = response.read()
        if request.method == "GET" and request.url.path in SELECTED:
            params: dict[str, list[str]] = {}
            for name, value in request.url.params.multi_items():
                params.setdefault(name, []).append(value)
            items = json.loads(content).get("items", []) if response.status_code == 200 else []
            self.seen.append(Seen(request.url.path, params, len(items)))
        return httpx.Response(response.status_code, headers=response.headers,
                              content=content, request=request)

    def close(self) -> None:
        self.inner.close()


def bag(records: Iterable[Any]) -> Counter[str]:
    """Records as a multiset: the same rows the same number of times, in any order."""
    return Counter(repr(r) for r in records)


@pytest.fixture(scope="module")
def practice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("practice")
    generate_practice(out, inc.PATIENTS, seed=7, now=NOW)
    return out


@pytest.fixture
def served(practice: Path) -> Iterator[tuple[Simulator, SimulatorServer, str]]:
    simulator = Simulator(clock=SimClock(NOW))
    simulator.load_portal_dir(practice / "portal", op_dir=practice / "op")
    server, url = start_simulator(simulator)
    yield simulator, server, url
    server.shutdown()
    simulator.close()


# -- the same answers as PortalTables ----------------------------------------------------


@pytest.mark.parametrize("batch", [100, 7])
def test_targeted_reads_match_the_csv_adapter(
    practice: Path, served: tuple[Simulator, SimulatorServer, str], batch: int
) -> None:
    """Hundreds of ids (several batches, rows matching in more than one of them) and a
    change time: the same records, each as often, as CsvPortalSource.select_*."""
    _, server, url = served
    tables = CsvPortalSource(practice / "portal")
    users = [u for u in tables.users() if isinstance(u, PortalUser)]
    rng = random.Random(11)
    ids = {u.user_id for u in rng.sample(users, 150)}
    patients = {u.op_patient_id for u in rng.sample(users, 120) if u.op_patient_id}
    contacts = {u.op_contact_id for u in rng.sample(users, 120) if u.op_contact_id}
    patients.add("P-NOBODY")  # an id nobody has selects nothing
    changed = sorted(u.updated_at for u in users if u.updated_at)[-40]
    with HttpPortal(url, None, page_size=50, select_batch=batch) as http:
        for kwargs in (
            {"ids": ids},
            {"patient_ids": patients, "contact_ids": contacts},
            {"ids": ids, "patient_ids": patients, "contact_ids": contacts,
             "changed_since": changed},
            {"changed_since": changed},
        ):
            got = list(http.select_users(**kwargs))
            want = list(tables.select_users(**kwargs))
            assert bag(got) == bag(want) and len(want) > 30, sorted(kwargs)
        assert list(http.select_users()) == []

        both_ends = ids | contacts  # caregivers and dependents alike
        links = list(http.select_links(both_ends))
        assert bag(links) == bag(tables.select_links(both_ends))
        assert any(isinstance(k, CaregiverLink) and k.caregiver_user_id in both_ends
                   and k.dependent_user_id in both_ends for k in links)  # asked for twice
        sources = list(http.select_sources(ids))
        assert bag(sources) == bag(tables.select_sources(ids))
        assert {s.user_id for s in sources if isinstance(s, PortalSource)} <= ids
        assert list(http.select_links(())) == list(http.select_sources(())) == []
    # 150 ids in batches of at most 100: more than one request for the first read alone.
    assert server.request_counts().get("GET /users", 0) >= 5


def test_rows_the_portal_holds_twice_come_back_twice_and_bad_items_stay_invalid() -> None:
    """Deduplicating the batches' answers must not hide a real duplicate row (the
    snapshot reports it), and an unparseable row is an InvalidRecord, once."""
    def user(uid: str, patient: str, active: str = "true") -> dict[str, str]:
        return {"user_id": uid, "op_patient_id": patient, "op_contact_id": "",
                "first_name": "A", "last_name": "B", "email": f"{uid}@dummy.com",
                "role": "Patient", "active": active, "updated_at": "2026-01-01T00:00:00Z"}

    simulator = Simulator(clock=SimClock(NOW))
    simulator.load(users=[user("U1", "P1"), user("U1", "P1"), user(" U2 ", "P2"),
                          user("U3", "P3", active="maybe"), user("U4", "P4")])
    server, url = start_simulator(simulator)
    try:
        with HttpPortal(url, None, page_size=2, select_batch=1) as http:
            got = list(http.select_users(ids={"U1", "U2", "U3"}, patient_ids={"P1", "P3"}))
    finally:
        server.shutdown()
        simulator.close()
    good = [u.user_id for u in got if isinstance(u, PortalUser)]
    bad = [r for r in got if isinstance(r, InvalidRecord)]
    assert sorted(good) == ["U1", "U1", "U2"]  # ids compare trimmed, as the parsers read
    assert [(r.source, r.portal_user_id) for r in bad] == [("portal_users", "U3")]


def test_the_api_refuses_blank_ids_and_too_many(
    served: tuple[Simulator, SimulatorServer, str]
) -> None:
    _, _, url = served
    with httpx.Client(base_url=url) as client:
        ok = client.get("/users", params={"user_id": ["U-none", "U-none2"]})
        assert ok.status_code == 200 and ok.json() == {"items": [], "next_cursor": None}
        comma = client.get("/sources", params={"user_id": "a,b"})  # one id, not two
        assert comma.status_code == 200 and comma.json()["items"] == []
        for params in ({"user_id": " "}, {"op_patient_id": [f"P{i}" for i in range(60)],
                                          "op_contact_id": [f"C{i}" for i in range(41)]},
                       {"user_id": [f"U{i}" for i in range(101)]}):
            for path in ("/users", "/links", "/sources"):
                if path != "/users" and "user_id" not in params:
                    continue
                answer = client.get(path, params=params)
                assert answer.status_code == 400, (path, answer.json())
    with pytest.raises(ValueError):
        HttpPortal(url, None, select_batch=101)
    with HttpPortal(url, None, max_retries=2) as http:
        http.select_batch = 150  # a client that disagrees with the API's limit
        with pytest.raises(PortalRejected) as err:
            list(http.select_users(ids={f"U{i}" for i in range(150)}))
        assert err.value.status == 400 and err.value.attempts == 1  # ours to fix: no retry


# -- an incremental scan over HTTP -----------------------------------------------------------


@pytest.mark.services
def test_an_incremental_scan_over_http_reads_only_the_changed_neighbourhood(
    practice: Path, tmp_path: Path, make_settings: Any
) -> None:
    """~20 changes, then an incremental scan through the portal API: the findings of a
    full scan, from a small fraction of the portal's users, links and sources — every
    portal list request it makes names the ids it wants."""
    tables = inc.read_tables(practice)
    store = inc.Store("csv", tmp_path / "src", None)
    store.write(tables)
    simulator = Simulator(clock=SimClock(NOW))
    simulator.load_portal_dir(tmp_path / "src" / "portal", op_dir=tmp_path / "src" / "op")
    server, url = start_simulator(simulator)
    recorder = Recorder()
    try:
        with HttpPortal(url, None, page_size=100, transport=recorder) as http:
            op = CsvOPSource(tmp_path / "src" / "op")
            settings = make_settings()
            incremental = inc.state_deps(tmp_path / "inc.sqlite", settings, op, http)
            full_reconcile(incremental, NOW)
            population = sum(s.items for s in recorder.seen if s.path == "/users")
            assert population == len(tables["portal_users"])
            shutil.copy(tmp_path / "inc.sqlite", tmp_path / "full.sqlite")
            full = inc.state_deps(tmp_path / "full.sqlite", settings, op, http)

            rng = random.Random("changes-http")
            kinds = [inc.change(tables, rng) for _ in range(20)]
            store.write(tables)
            simulator.load_portal_dir(tmp_path / "src" / "portal",
                                      op_dir=tmp_path / "src" / "op")

            later = NOW + timedelta(minutes=30)
            recorder.seen.clear()
            before = server.request_counts()
            result = incremental_reconcile(incremental, later)
            after = server.request_counts()
            read = list(recorder.seen)
            full_reconcile(full, later)
            assert result.kind == "incremental" and not result.scope.is_all, kinds
            assert inc.open_findings(incremental) == inc.open_findings(full), kinds

            # Every list request selected by id (or change time); none paged everything.
            assert read and all(
                {"user_id", "op_patient_id", "op_contact_id", "changed_since"} & set(s.params)
                for s in read
            ), [(s.path, sorted(s.params)) for s in read if not s.params.keys() - {"limit"}]
            users_read = sum(s.items for s in read if s.path == "/users")
            assert 0 < users_read < population // 4, (users_read, population)
            for path, total in (("/links", len(tables["portal_links"])),
                                ("/sources", len(tables["portal_sources"]))):
                assert sum(s.items for s in read if s.path == path) < total // 4, path
            user_requests = after.get("GET /users", 0) - before.get("GET /users", 0)
            assert user_requests == sum(1 for s in read if s.path == "/users")
            assert user_requests < population // 100  # a full read takes one per 100
    finally:
        server.shutdown()
        simulator.close()
        store.close()
