"""The console over real HTTP: who gets in, what a stranger sees, CSRF, cookies, headers."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from console_world import OPERATOR, VIEWER, LiveConsole, World, csrf_of
from freezegun import freeze_time
from sqlalchemy import select

from worker.state.models import AuditEntry, FindingRow
from worker.state.models import FindingState as S
from worker.web import auth
from worker.web.security import COOKIE, SessionData

PAGES = ["/", "/findings", "/families/P000029", "/batches/1", "/adhoc/x"]
HTML = {"Accept": "text/html,application/xhtml+xml"}


def test_healthz_answers_without_a_login_and_says_nothing_else(console: LiveConsole) -> None:
    r = console.client().get("/healthz")
    assert r.status_code == 200 and r.text == "ok"
    assert "set-cookie" not in r.headers


@pytest.mark.parametrize("path", PAGES)
def test_without_a_session_pages_redirect_to_login_and_show_no_patient_data(
    console: LiveConsole, path: str
) -> None:
    client = console.client()
    r = client.get(path, headers=HTML)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    assert "P0000" not in r.text and "C0000" not in r.text
    api = client.get(path, headers={"Accept": "application/json"})
    assert api.status_code == 401 and api.json() == {"error": "login required"}
    login = client.get(r.headers["location"], headers=HTML)
    assert login.status_code == 200
    assert re.findall(r'<input[^>]*name="(\w+)"', login.text) == [
        "csrf_token", "next", "username", "password"]
    # The path asked for comes back in the form (ids only); nothing else about anyone.
    rest = login.text.replace(f'value="{path}"', "")
    assert not re.search(r"[PC]0000|finding|@", rest, re.IGNORECASE)


def test_a_wrong_password_is_refused_and_repeated_failures_are_slowed(
    console: LiveConsole
) -> None:
    client = console.client()
    token = csrf_of(client.get("/login", headers=HTML).text)
    free = console.app.state.console.settings.web_login_free_failures
    for _ in range(free):
        r = client.post("/login", data={"username": OPERATOR[0], "password": "wrong-guess-00",
                                        "csrf_token": token})
        assert r.status_code == 401 and "Wrong user name or password" in r.text
    # Now even the right password must wait: the try is refused without being checked.
    r = client.post("/login", data={"username": OPERATOR[0], "password": OPERATOR[1],
                                    "csrf_token": token})
    assert r.status_code == 429 and "try again in" in r.text
    assert client.get("/", headers=HTML).status_code == 303


def test_failed_login_delays_double_and_a_success_clears_them(world: World) -> None:
    """The time rule itself, frozen: free failures, then 5 s, 10 s, 20 s ... waits."""
    practice, name = world.settings.practice, OPERATOR[0]
    t = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

    def attempt(at: datetime, password: str = "nope-nope-nope") -> tuple[bool, int]:
        with freeze_time(at), world.sessions.begin() as s:
            result = auth.login(s, practice, name, password, datetime.now(UTC), 3)
            return result.user is not None, result.wait_seconds

    assert [attempt(t) for _ in range(3)] == [(False, 0)] * 3  # the 3rd starts a 5 s wait
    assert attempt(t + timedelta(seconds=2.5), OPERATOR[1]) == (False, 3)
    assert attempt(t + timedelta(seconds=5)) == (False, 0)  # 4th failure: a 10 s wait
    assert attempt(t + timedelta(seconds=14.9), OPERATOR[1]) == (False, 1)
    assert attempt(t + timedelta(seconds=15), OPERATOR[1]) == (True, 0)
    assert [attempt(t + timedelta(seconds=15)) for _ in range(2)] == [(False, 0)] * 2
    # The wait never exceeds fifteen minutes, however many failures.
    for _ in range(30):
        t += timedelta(days=1)
        attempt(t)
    assert attempt(t + timedelta(minutes=14, seconds=59))[1] == 1
    assert attempt(t + timedelta(minutes=15)) == (False, 0)


def test_the_session_cookie_is_httponly_samesite_and_secure_over_https(
    console: LiveConsole
) -> None:
    client = console.client()
    r = client.get("/login", headers=HTML)
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie
    assert "SameSite=lax" in cookie and "Secure" not in cookie
    # Behind a TLS proxy on the same host (uvicorn trusts 127.0.0.1's X-Forwarded-Proto).
    r = client.get("/login", headers={**HTML, "X-Forwarded-Proto": "https"})
    assert "Secure" in r.headers["set-cookie"]
    assert r.headers["strict-transport-security"].startswith("max-age=")


def test_every_response_carries_a_strict_content_security_policy(console: LiveConsole) -> None:
    client = console.login(OPERATOR)
    for path in ["/", "/findings", "/families/P000029", "/login", "/healthz",
                 "/static/console.js"]:
        r = client.get(path, headers=HTML)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp, path
        assert "frame-ancestors 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer"
    assert client.get("/").headers["cache-control"] == "no-store"


def test_templates_have_no_inline_script_or_style() -> None:
    """What the CSP would block anyway: so a page never silently loses a behaviour."""
    from pathlib import Path

    import worker.web

    for path in (Path(worker.web.__file__).parent / "templates").glob("*.html"):
        text = path.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), path.name
        assert " style=" not in text and "<style" not in text, path.name
        assert not re.search(r"\son[a-z]+=", text), path.name


def _post_routes(console: LiveConsole) -> list[str]:
    paths = []
    for route in console.app.routes:
        if "POST" in (getattr(route, "methods", None) or ()):
            paths.append(route.path.replace("{patient_id:str}", "P000029")
                          .replace("{run_id:int}", "1").replace("{decision:str}", "approve")
                          .replace("{fingerprint:str}", "fp").replace("{switch:str}", "pause"))
    return paths


def test_every_state_changing_request_without_the_csrf_token_is_refused(
    console: LiveConsole, world: World
) -> None:
    client = console.login(OPERATOR)
    routes = _post_routes(console)
    assert {"/login", "/logout", "/fixes/pause", "/families/P000029/reconcile",
            "/findings/fp/silence", "/batches/1/approve"} <= set(routes)
    for path in routes:
        for data in ({}, {"csrf_token": "forged"}):
            r = client.post(path, data={**data, "reason": "x", "until": "2030-01-01"})
            assert r.status_code == 403 and "CSRF" in r.text, path
    # Nothing happened: no pause, no audit entry, still logged in.
    with world.sessions() as s:
        assert s.scalars(select(AuditEntry)).all() == []
    assert "Fixes are running" in client.get("/", headers=HTML).text


def test_a_viewer_may_look_but_every_operator_action_is_refused(
    console: LiveConsole, world: World
) -> None:
    client = console.login(VIEWER)
    page = client.get("/families/P000029", headers=HTML)
    assert page.status_code == 200
    assert 'id="reconcile" type="submit" disabled' in page.text
    token = csrf_of(page.text)
    for path in _post_routes(console):
        if path in ("/login", "/logout"):
            continue
        r = client.post(path, data={"csrf_token": token, "reason": "x", "until": "2030-01-01"})
        assert r.status_code == 403 and "operator role" in r.text, path
    with world.sessions() as s:
        assert s.scalars(select(AuditEntry)).all() == []
        assert S.SILENCED not in set(s.scalars(select(FindingRow.state)))


def test_a_session_ends_after_the_idle_time_and_on_logout(
    console: LiveConsole, world: World
) -> None:
    signer = console.app.state.console.signer
    with world.sessions() as s:
        user = auth.get_user(s, world.settings.practice, OPERATOR[0])
        assert user is not None
        uid, version = user.id, user.session_version
    idle = world.settings.web_session_idle_minutes
    with freeze_time(datetime.now(UTC) - timedelta(minutes=idle + 1)):
        stale = signer.dumps(SessionData(user_id=uid, version=version,
                                         seen=datetime.now(UTC).timestamp()))
    with freeze_time(datetime.now(UTC) - timedelta(minutes=idle - 1)):
        fresh = signer.dumps(SessionData(user_id=uid, version=version,
                                         seen=datetime.now(UTC).timestamp()))
    client = console.client()
    assert client.get("/", headers={**HTML, "Cookie": f"{COOKIE}={stale}"}).status_code == 303
    assert client.get("/", headers={**HTML, "Cookie": f"{COOKIE}={fresh}"}).status_code == 200
    # A forged cookie (another key) is nobody.
    from worker.web.security import Signer

    forged = Signer("not-the-key").dumps(SessionData(user_id=uid, version=version,
                                                     seen=datetime.now(UTC).timestamp()))
    assert client.get("/", headers={**HTML, "Cookie": f"{COOKIE}={forged}"}).status_code == 303

    logged_in = console.login(OPERATOR)
    copy = logged_in.cookies[COOKIE]
    token = csrf_of(logged_in.get("/", headers=HTML).text)
    assert logged_in.post("/logout", data={"csrf_token": token}).status_code == 303
    again = console.client().get("/", headers={**HTML, "Cookie": f"{COOKIE}={copy}"})
    assert again.status_code == 303


def test_links_carry_ids_only_even_when_names_are_shown(
    world: World, make_settings: Any
) -> None:
    """With web_show_names on, a family page names its people, but no href or form
    action carries a name or an address."""
    settings = world.settings.model_copy(update={"web_show_names": True})
    live = LiveConsole(settings, world.sessions).start()
    try:
        client = live.login(OPERATOR)
        html = client.get("/families/P000029", headers=HTML).text
    finally:
        live.stop()
    import csv

    with (world.practice / "op" / "contacts.csv").open() as fh:
        people = {r["contact_id"]: r for r in csv.DictReader(fh)}
    mother = people["C000030"]
    assert f"{mother['first_name']} {mother['last_name']}" in html
    targets = re.findall(r'(?:href|action)="([^"]*)"', html)
    assert targets and all(re.fullmatch(r"[/A-Za-z0-9_.?=&;:#-]*", t) for t in targets), targets
    for t in targets:
        assert mother["last_name"] not in t and "@" not in t


def test_findings_filter_and_page_by_keyset(console: LiveConsole, world: World) -> None:
    client = console.login(OPERATOR)
    all_rows = client.get("/findings?state=all", headers=HTML).text
    total = int(re.search(r"(\d+) finding\(s\) match", all_rows).group(1))  # type: ignore[union-attr]
    with world.sessions() as s:
        assert total == len(s.scalars(select(FindingRow.id)).all())
    r = client.get("/findings?check=contact_inactive&state=all", headers=HTML).text
    assert "contact_inactive" in r and "self_role</td>" not in r
    high = client.get("/findings?severity=high&state=all", headers=HTML).text
    assert "<td>warning</td>" not in high
    older = client.get("/findings?age=30d&state=all", headers=HTML).text
    assert "0 finding(s) match" in older  # the demo's findings are younger than 30 days
    # Paging: 3 rows to a page here, following "next page" links visits every row once.
    from worker.web import views

    old, views.PAGE_SIZE = views.PAGE_SIZE, 3
    try:
        seen: list[str] = []
        url: str | None = "/findings?state=all"
        while url:
            html = client.get(url, headers=HTML).text
            seen += re.findall(r'<tr class="sev-', html)
            nxt = re.search(r'id="next-page" href="([^"]+)"', html)
            url = nxt.group(1).replace("&amp;", "&") if nxt else None
        assert len(seen) == total
    finally:
        views.PAGE_SIZE = old


def test_a_bad_silence_is_a_one_line_refusal_not_an_error(
    console: LiveConsole, world: World
) -> None:
    client = console.login(OPERATOR)
    token = csrf_of(client.get("/", headers=HTML).text)
    r = client.post("/findings/no-such-fp/silence", data={
        "csrf_token": token, "reason": "x", "until": "2030-01-01", "back": "/findings"})
    assert r.status_code == 303
    page = client.get("/findings", headers=HTML).text
    assert "Not done: no finding with fingerprint no-such-fp" in page
    r = client.post("/findings/no-such-fp/silence", data={
        "csrf_token": token, "reason": "x", "until": "2030-01-01", "back": "https://evil.example/"})
    assert r.headers["location"] == "/findings"  # never an open redirect


def test_a_finding_that_names_only_a_contact_leads_to_its_family(
    console: LiveConsole, world: World
) -> None:
    """Staff reach the family of every open finding from the list, also when the finding
    names a contact and no patient (a duplicate group, an inactive contact): one chart →
    that family's page; several or none → the contact's page with its charts and findings."""
    with world.sessions() as s:
        rows = [r for r in s.scalars(select(FindingRow)) if not r.patient_id
                and (r.contact_id or r.contact_ids)]
    assert rows, "the demo practice has contact-only findings"
    client = console.login(OPERATOR)
    listing = client.get("/findings?state=all", headers=HTML).text
    for row in rows:
        cid = row.contact_id or row.contact_ids[0]
        assert f'href="/contacts/{cid}"' in listing
        page = client.get(f"/contacts/{cid}", headers=HTML, follow_redirects=False)
        if page.status_code == 303:
            family = page.headers["location"]
            assert family.startswith("/families/")
            assert client.get(family, headers=HTML).status_code == 200
        else:
            assert page.status_code == 200 and 'id="charts"' in page.text
            assert row.check in page.text
    unknown = client.get("/contacts/C999999", headers=HTML, follow_redirects=False)
    assert unknown.status_code == 200 and "On no chart" in unknown.text
