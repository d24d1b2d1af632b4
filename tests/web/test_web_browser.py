"""Staff using the console in real headless Chromium (Debian's chromium and
chromium-driver): log in, open a family from the dashboard, silence a finding, approve a
staged batch, run an ad hoc reconcile on a real worker and watch it finish, follow a
finding that names only contacts to their families, and a viewer who finds every action
disabled.

With OPRECON_TEST_SCREENSHOTS_DIR set (scripts/console-screenshots.sh sets it to docs/), the
first test saves the dashboard, findings and family pages there, the second the contact page.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from console_world import OPERATOR, VIEWER, LiveConsole, World
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from sqlalchemy import select

from tests.conftest import BROKER_URL, REDIS_URL
from tests.procs import CeleryWorker, base_env, wait_for
from worker.state.models import ActionRow, ActionStatus, AuditEntry, FindingRow
from worker.state.models import FindingState as S

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.fail("chromium and chromium-driver are needed (apt-get install -y chromium "
                    "chromium-driver; scripts/ensure-services.sh does it)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--disable-gpu",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: WebDriver) -> Iterator[WebDriver]:
    yield browser
    browser.delete_all_cookies()


def log_in(d: WebDriver, console: LiveConsole, user: tuple[str, str]) -> None:
    d.get(console.url + "/")
    assert d.current_url.startswith(console.url + "/login")
    d.find_element(By.NAME, "username").send_keys(user[0])
    d.find_element(By.NAME, "password").send_keys(user[1])
    submit(d, d.find_element(By.CSS_SELECTOR, "form[action='/login'] button"))
    assert d.title.startswith("Dashboard")
    assert f"{user[0]} · " in d.find_element(By.CSS_SELECTOR, "header .who").text


def shot(d: WebDriver, name: str) -> None:
    """The whole page (not just the window) into $OPRECON_TEST_SCREENSHOTS_DIR/name."""
    folder = os.environ.get("OPRECON_TEST_SCREENSHOTS_DIR")
    if not folder:
        return
    import base64

    height = int(d.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]["height"])
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        png = d.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})["data"]
        (Path(folder) / name).write_bytes(base64.b64decode(png))
    finally:
        d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def submit(d: WebDriver, button: Any) -> None:
    """Click, then wait until the page it leads to has replaced this one and loaded (a
    flash message on the old page must not be mistaken for the new one's). The old page
    is marked on its window object, which the next page does not have."""
    d.execute_script("window.__oprecon_old_page = true;")
    button.click()
    wait_for(lambda: d.execute_script(
        "return window.__oprecon_old_page === undefined && document.readyState === 'complete';"),
        15, "the next page")


def flash(d: WebDriver) -> str:
    return str(wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "p.flash"), 15,
                        "the result of the action")[0].text)


def test_operator_opens_a_family_from_the_dashboard_and_silences_a_finding(
    page: WebDriver, console: LiveConsole, world: World
) -> None:
    d = page
    log_in(d, console, OPERATOR)
    health = d.find_element(By.CSS_SELECTOR, "table.health").text
    for part in ("sources", "redis", "broker", "state db", "worker", "beat"):
        assert part in health
    shot(d, "console-dashboard.png")
    d.get(console.url + "/findings")
    assert "finding(s) match" in d.find_element(By.CSS_SELECTOR, "p.count").text
    shot(d, "console-findings.png")

    d.get(console.url + "/")
    submit(d, d.find_element(By.LINK_TEXT, "P000029"))
    assert d.current_url.endswith("/families/P000029")
    contacts = d.find_element(By.ID, "contacts").text
    # The guide's checklist: the mother's caregiver user is not linked to this child.
    assert "C000030 Mother Joint yes active present, valid" in contacts
    assert "NOT linked" in contacts
    shot(d, "console-family.png")

    article = d.find_element(By.CSS_SELECTOR, "article.finding")
    fingerprint = article.get_attribute("id").removeprefix("f-")
    article.find_element(By.NAME, "reason").send_keys("family asked us to wait a week")
    submit(d, article.find_element(By.CSS_SELECTOR, "button.silence"))
    assert flash(d).startswith("Silenced caregiver_link_missing until ")
    assert "silenced by olivia" in d.find_element(By.ID, f"f-{fingerprint}").text
    audit = d.find_element(By.ID, "audit").text
    assert "olivia silence finding" in audit and "family asked us to wait a week" in audit
    assert "silenced by olivia" in d.find_element(By.ID, "timeline").text
    with world.sessions() as s:
        row = s.scalar(select(FindingRow).where(FindingRow.fingerprint == fingerprint))
        assert row is not None and row.state == S.SILENCED and row.silenced_by == "olivia"

    submit(d, d.find_element(By.ID, f"f-{fingerprint}").find_element(
        By.CSS_SELECTOR, "button.unsilence"))
    assert flash(d).startswith("Unsilenced caregiver_link_missing")
    with world.sessions() as s:
        row = s.scalar(select(FindingRow).where(FindingRow.fingerprint == fingerprint))
        assert row is not None and row.state == S.OPEN


def test_staff_follow_a_finding_that_names_only_contacts_to_their_families(
    page: WebDriver, console: LiveConsole, world: World
) -> None:
    """A duplicate group names contacts, not a chart: its row links to the contact's
    page, which lists the charts they are on (read from OP now) and the findings naming
    them, and each chart opens its family."""
    d = page
    log_in(d, console, OPERATOR)
    d.get(console.url + "/findings?check=contact_duplicate&state=all")
    submit(d, d.find_element(By.LINK_TEXT, "via contact"))
    assert "/families/" in d.current_url or "/contacts/" in d.current_url
    # C000136 is a family contact on two charts: the page lets staff choose.
    d.get(console.url + "/contacts/C000136")
    charts = d.find_element(By.ID, "charts").text
    assert "P000127" in charts and "P000128" in charts
    assert "authority_invalid" in d.find_element(By.ID, "contact-findings").text
    shot(d, "console-contact.png")
    submit(d, d.find_element(By.LINK_TEXT, "P000127"))
    assert d.current_url.endswith("/families/P000127")
    assert "C000136" in d.find_element(By.ID, "contacts").text


def test_operator_reviews_each_staged_fix_then_approves_the_batch(
    page: WebDriver, console: LiveConsole, world: World
) -> None:
    d = page
    run_id = world.staged_run()
    with world.sessions() as s:
        staged = s.scalars(select(ActionRow).where(ActionRow.status == ActionStatus.STAGED)
                           ).all()
    log_in(d, console, OPERATOR)
    batches = d.find_element(By.ID, "batches")
    assert f"{run_id} {len(staged)}" in batches.text
    submit(d, batches.find_element(By.LINK_TEXT, "review each fix"))
    rows = d.find_elements(By.CSS_SELECTOR, "#staged tbody tr")
    assert sorted(r.text.split()[0] for r in rows) == sorted(str(a.id) for a in staged)
    submit(d, d.find_element(By.ID, "approve"))
    message = flash(d)
    assert message.startswith(f"run {run_id}: approved")
    assert "None: nothing waits for a decision." in d.page_source
    with world.sessions() as s:
        left = s.scalars(select(ActionRow.status).where(ActionRow.run_id == run_id)).all()
        assert ActionStatus.STAGED not in left
        entries = s.scalars(select(AuditEntry).where(AuditEntry.action == "approve batch")
                            ).all()
    assert {e.username for e in entries} == {"olivia"}
    assert any(e.patient_id is None and e.target == f"run {run_id}" for e in entries)


def test_a_viewer_sees_every_action_disabled(
    page: WebDriver, console: LiveConsole, world: World
) -> None:
    d = page
    log_in(d, console, VIEWER)
    assert not d.find_element(By.CSS_SELECTOR, "form[action='/fixes/pause'] button"
                              ).is_enabled()
    d.get(f"{console.url}/batches/{world.staged_run()}")
    assert not d.find_element(By.ID, "approve").is_enabled()
    assert not d.find_element(By.ID, "reject").is_enabled()
    d.get(console.url + "/families/P000029")
    assert not d.find_element(By.ID, "reconcile").is_enabled()
    assert not d.find_element(By.CSS_SELECTOR, "button.silence").is_enabled()
    # Forcing the form anyway (enabling it in the page) is refused by the server.
    d.execute_script("document.querySelectorAll('form.silence input, form.silence button')"
                     ".forEach(function (e) { e.disabled = false; });")
    d.find_element(By.CSS_SELECTOR, "form.silence input[name=reason]").send_keys("x")
    submit(d, d.find_element(By.CSS_SELECTOR, "button.silence"))
    assert "operator role" in d.page_source
    with world.sessions() as s:
        assert s.scalars(select(AuditEntry)).all() == []
        assert S.SILENCED not in set(s.scalars(select(FindingRow.state)))


@pytest.fixture
def worker(world: World, tmp_path: Path) -> Iterator[CeleryWorker]:
    for url in (BROKER_URL, REDIS_URL):
        client = redis.Redis.from_url(url)
        client.flushdb()
        client.close()
    s = world.settings
    env: dict[str, Any] = {
        "OPRECON_STATE_DB_URL": s.state_db_url, "OPRECON_BROKER_URL": s.broker_url,
        "OPRECON_REDIS_URL": s.redis_url, "OPRECON_PRACTICE": s.practice,
        "OPRECON_OP_DIR": str(s.op_dir), "OPRECON_PORTAL_SOURCE": "http",
        "OPRECON_PORTAL_URL": str(s.portal_url), "OPRECON_METRICS_PORT": "0",
        "OPRECON_LOG_FORMAT": "json",
    }
    proc = CeleryWorker(tmp_path, base_env(**env), name="console").start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_operator_runs_an_ad_hoc_reconcile_and_watches_it_finish(
    page: WebDriver, console: LiveConsole, world: World, worker: CeleryWorker
) -> None:
    d = page
    log_in(d, console, OPERATOR)
    d.get(console.url + "/families/P000029")
    submit(d, d.find_element(By.ID, "reconcile"))
    assert flash(d).startswith("Ad hoc reconcile queued as task ")
    box = d.find_element(By.ID, "adhoc")
    def finished() -> bool:
        worker.check_alive()
        return box.get_attribute("data-state") in ("done", "failed", "lost", "skipped")

    # Up to the 120 s an ad hoc run may wait for the scan lock, plus the run itself.
    wait_for(finished, 180, "the ad hoc run to finish on the worker", every=0.5)
    assert box.get_attribute("data-state") == "done", (box.text, worker.log()[-3000:])
    assert box.text.startswith("done: run ")
    assert "patient P000029" in d.find_element(By.ID, "audit").text
    submit(d, d.find_element(By.ID, "adhoc-reload"))
    assert d.current_url.endswith("/families/P000029")
