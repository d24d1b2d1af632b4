"""The console's writes on PostgreSQL (the production state database): login and its
throttle, silence and unsilence, a batch approved, pause and resume, all audited and
shown on the family page. The other console tests run the same code on SQLite."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from console_world import OPERATOR, LiveConsole, World, csrf_of
from sqlalchemy import select
from sqlalchemy.engine import make_url

from worker.state.db import kv_get
from worker.state.models import ActionRow, ActionStatus, AuditEntry, FindingRow
from worker.state.models import FindingState as S

HTML = {"Accept": "text/html"}


@pytest.fixture
def state_overrides(pg_database: str) -> dict[str, Any]:
    # One throw-away database for the session; a practice of its own per test.
    return {"state_db_url": pg_database, "practice": f"web-{uuid.uuid4().hex[:8]}"}


def test_operator_actions_on_postgresql_are_done_and_audited(
    console: LiveConsole, world: World
) -> None:
    assert make_url(world.settings.state_db_url).get_backend_name() == "postgresql"
    practice = world.settings.practice
    client = console.login(OPERATOR)
    family = client.get("/families/P000012", headers=HTML).text
    token = csrf_of(family)
    fp = re.search(r'action="/findings/([^"]+)/silence"', family).group(1)  # type: ignore[union-attr]

    def post(path: str, **data: str) -> str:
        r = client.post(path, data={"csrf_token": token, **data})
        assert r.status_code == 303, (path, r.status_code, r.text)
        return client.get(r.headers["location"], headers=HTML).text

    page = post(f"/findings/{fp}/silence", reason="family moved; chart closes next month",
                until="2031-01-15", back="/families/P000012")
    assert "Silenced patient_inactive until 2031-01-15 00:00 EST." in page
    page = post(f"/findings/{fp}/unsilence", back="/families/P000012")
    assert "open again" in page
    run_id = world.staged_run()
    page = post(f"/batches/{run_id}/approve")
    assert f"run {run_id}: approved" in page
    post("/fixes/pause", reason="portal maintenance tonight")
    assert "Fixes are PAUSED" in client.get("/", headers=HTML).text
    post("/fixes/resume")

    with world.sessions() as s:
        row = s.scalar(select(FindingRow).where(FindingRow.practice == practice,
                                                FindingRow.fingerprint == fp))
        assert row is not None and row.state == S.OPEN
        statuses = set(s.scalars(select(ActionRow.status).where(
            ActionRow.practice == practice, ActionRow.run_id == run_id)))
        assert ActionStatus.STAGED not in statuses
        assert kv_get(s, practice, "paused") == {
            "paused": False, "reason": "resumed in the console",
            "at": kv_get(s, practice, "paused")["at"]}  # type: ignore[index]
        actions = [a.action for a in s.scalars(
            select(AuditEntry).where(AuditEntry.practice == practice).order_by(AuditEntry.id))]
    assert actions[:2] == ["silence", "unsilence"]
    assert actions.count("approve batch") >= 2  # the batch, and each family it touched
    assert actions[-2:] == ["pause fixes", "resume fixes"]
    audit = client.get("/families/P000012", headers=HTML).text
    assert "family moved; chart closes next month" in audit


def test_login_throttle_is_shared_through_postgresql(console: LiveConsole, world: World
                                                     ) -> None:
    """A second console (another app on the same database, as a second process would
    be) sees the count the first one kept."""
    client = console.client()
    token = csrf_of(client.get("/login", headers=HTML).text)
    for _ in range(world.settings.web_login_free_failures):
        client.post("/login", data={"username": OPERATOR[0], "password": "not it at all",
                                    "csrf_token": token})
    other = LiveConsole(world.settings, world.sessions).start()
    try:
        c2 = other.client()
        token2 = csrf_of(c2.get("/login", headers=HTML).text)
        r = c2.post("/login", data={"username": OPERATOR[0], "password": OPERATOR[1],
                                    "csrf_token": token2})
        assert r.status_code == 429
    finally:
        other.stop()


def test_the_contact_page_finds_a_duplicate_group_by_member_on_postgresql(
    console: LiveConsole, world: World
) -> None:
    """The contact page looks a contact up inside duplicate groups (a JSON list of ids,
    matched as text): the same on PostgreSQL as on SQLite."""
    with world.sessions() as s:
        group = s.scalar(select(FindingRow).where(
            FindingRow.practice == world.settings.practice,
            FindingRow.check == "contact_duplicate"))
    assert group is not None and group.contact_ids
    client = console.login(OPERATOR)
    for member in group.contact_ids:
        page = client.get(f"/contacts/{member}", headers=HTML, follow_redirects=False)
        if page.status_code == 200:
            assert "contact_duplicate" in page.text
        else:  # on one chart: straight to the family, whose page lists the group
            assert page.status_code == 303
            family = client.get(page.headers["location"], headers=HTML).text
            assert "contact_duplicate" in family or member in family
    from worker.web.views import contact_findings

    with world.sessions() as s:
        found = contact_findings(world.settings, s, group.contact_ids[-1], world.t0)
    assert [f["fingerprint"] for f in found if f["check"] == "contact_duplicate"] == [
        group.fingerprint]
