"""Digests end to end: a real SMTP server (aiosmtpd) and a real HTTP server on loopback,
findings seeded in a SQLite state database, freezegun only around the window functions.
The Celery tasks run in a real `celery worker` process (tests/procs.py) on a private
redis-server, its SMTP retry against a relay that defers the first run.
"""

from __future__ import annotations

import email
import email.policy
import io
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from freezegun import freeze_time
from markupsafe import escape
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from config.settings import Settings
from tests import factory
from tests.procs import CeleryWorker, RedisServer, base_env, send_task, stop_smtp, wait_for
from worker.checks.catalog import CHECK_IDS
from worker.checks.remedies import ESCALATION, REMEDIES
from worker.cli.digest import digest_command, render_example
from worker.digest import build as b
from worker.digest import send
from worker.model.findings import fingerprint
from worker.state.db import kv_get, kv_set, make_engine, migrate, session_factory
from worker.state.models import ActionRow, DigestSent, FindingRow, KeyValue

# 07:40 in New York, ten minutes after the 2026-11-25 window closed (07:30 EST = 12:30Z).
NOW = datetime(2026, 11, 25, 12, 40, tzinfo=UTC)
CLOSE = datetime(2026, 11, 25, 12, 30, tzinfo=UTC)
PREV_CLOSE = datetime(2026, 11, 24, 12, 30, tzinfo=UTC)
FD = "frontdesk@example.org"
PM = "manager@example.org"


# -- servers ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SmtpSink:
    """Stores every accepted message; `fail_next` replies make it refuse the next DATAs.
    `attempts`: when each DATA arrived (monotonic seconds), accepted or not."""

    port: int = 0
    messages: list[tuple[list[str], EmailMessage]] = field(default_factory=list)
    fail_next: list[str] = field(default_factory=list)
    attempts: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.attempts.append(time.monotonic())
            if self.fail_next:
                reply = self.fail_next.pop(0)
                if reply == "DROP":  # the message arrived, then the line died
                    self.messages.append(([], EmailMessage()))
                    server.transport.close()
                return reply
            msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
            self.messages.append((list(envelope.rcpt_tos), msg))  # type: ignore[arg-type]
        return "250 OK"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for rcpts, m in self.messages if address in rcpts]


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink(port=_free_port())
    controller = Controller(sink, hostname="127.0.0.1", port=sink.port)
    controller.start()
    try:
        yield sink
    finally:
        stop_smtp(controller)


@dataclass
class HookSink:
    port: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # replies to use first, then 200


@pytest.fixture
def webhook() -> Iterator[HookSink]:
    sink = HookSink()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = sink.statuses.pop(0) if sink.statuses else 200
            if status == 200:
                sink.bodies.append(json.loads(body))
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    sink.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()


# -- state database --------------------------------------------------------------------


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Migrate once; each test copies the file (Alembic per test would be the slow part)."""
    path = tmp_path_factory.mktemp("digest-template") / "state.sqlite"
    migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Iterator[None]:
    b._warned.clear()
    yield
    b._warned.clear()


@dataclass
class Env:
    settings: Settings
    sessions: sessionmaker[Session]

    def add(self, check: str, state: str, first_seen: datetime, *, severity: str = "warning",
            patient: str | None = None, contact: str | None = None, user: str | None = None,
            detail: str = "", changed: datetime | None = None,
            resolved: datetime | None = None, contacts: list[str] | None = None) -> str:
        fp = fingerprint(check, patient, contact, user, contacts or ())
        with self.sessions.begin() as s:
            s.add(FindingRow(
                practice=self.settings.practice, fingerprint=fp, check=check,
                severity=severity, state=state, patient_id=patient, contact_id=contact,
                portal_user_id=user, contact_ids=contacts,
                detail=detail or f"{check} on {patient or contact or user}",
                first_seen_at=first_seen, last_seen_at=first_seen,
                state_changed_at=changed or first_seen, resolved_at=resolved,
            ))
        return fp

    def mark_sent(self, address_or_key: str, window_key: str, status: str = "sent",
                  created: datetime | None = None) -> None:
        key = b.recipient_key(address_or_key) if "@" in address_or_key else address_or_key
        with self.sessions.begin() as s:
            s.add(DigestSent(practice=self.settings.practice, recipient=key,
                             window_key=window_key, channel="email", status=status,
                             created_at=created or NOW, sent_at=created or NOW))

    def rows(self) -> list[DigestSent]:
        with self.sessions() as s:
            return list(s.scalars(select(DigestSent).order_by(DigestSent.id)))

    def send_due(self, now: datetime = NOW, **kw: Any) -> list[send.Delivery]:
        return [
            send.deliver(self.settings, self.sessions, r, w, now=now, sleep=lambda _: None, **kw)
            for r, w in send.tick(self.settings, self.sessions, now)
        ]


@pytest.fixture
def env(make_settings: Any, template_db: Path, tmp_path: Path, smtp: SmtpSink) -> Iterator[Any]:
    engines: list[Any] = []

    def factory_(**overrides: Any) -> Env:
        db = tmp_path / f"digest-{len(list(tmp_path.glob('digest-*.sqlite')))}.sqlite"
        shutil.copy(template_db, db)
        values: dict[str, Any] = {
            "state_db_url": f"sqlite:///{db}",
            "digest_recipients": {"front_desk": [FD], "practice_manager": [PM]},
            "digest_time": "07:30",
            "digest_timezone": "America/New_York",
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp.port,
            "smtp_sender": "oprecon@practice.example",
        }
        values.update(overrides)
        settings = make_settings(**values)
        engine = make_engine(settings.state_db_url)
        engines.append(engine)
        return Env(settings, session_factory(engine))

    yield factory_
    for engine in engines:
        engine.dispose()


def parts(msg: EmailMessage) -> tuple[str, str]:
    text = msg.get_body(preferencelist=("plain",))
    html = msg.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


def after_yesterday(e: Env) -> None:
    """Both recipients got yesterday's digest: today's is a normal one, not the backlog."""
    e.mark_sent(FD, "daily:2026-11-24", created=PREV_CLOSE)
    e.mark_sent(PM, "daily:2026-11-24", created=PREV_CLOSE)


# -- routing and windows ---------------------------------------------------------------


def test_every_check_has_a_route() -> None:
    assert set(b.ROUTES) == set(CHECK_IDS)
    assert b.route("caregiver_link_stale", "open") == b.PRACTICE_MANAGER
    assert b.route("welcome_not_sent", "escalated") == b.PRACTICE_MANAGER
    assert b.route("welcome_not_sent", "open") == b.FRONT_DESK


def test_empty_category_falls_back_to_default(make_settings: Any) -> None:
    s = make_settings(digest_recipients={"default": ["a@example.org"], "front_desk": [FD]})
    by_key = {r.key: r for r in b.resolve_recipients(s)}
    assert by_key[b.recipient_key(FD)].categories == {b.FRONT_DESK}
    assert by_key[b.recipient_key("a@example.org")].categories == {b.PRACTICE_MANAGER}


def test_one_address_in_two_categories_gets_one_digest(make_settings: Any) -> None:
    s = make_settings(digest_recipients={"front_desk": [FD], "practice_manager": [FD.upper()]})
    [only] = b.resolve_recipients(s)
    assert only.categories == set(b.CATEGORIES)


def test_no_recipients_sends_nothing_and_warns_once(env: Any) -> None:
    e = env(digest_recipients={})
    e.add("authority_invalid", "open", NOW - timedelta(hours=3), patient="P1", contact="C1")
    with capture_logs() as logs:
        assert send.tick(e.settings, e.sessions, NOW) == []
        assert send.tick(e.settings, e.sessions, NOW) == []
    warnings = [x for x in logs if x["log_level"] == "warning"]
    assert [w["event"] for w in warnings].count("digest_no_recipients") == 1
    assert e.rows() == []


def test_daily_window_closes_exactly_at_digest_time(make_settings: Any) -> None:
    s = make_settings(digest_time="07:30", digest_timezone="America/New_York")
    with freeze_time("2026-11-25 12:29:59"):  # 07:29:59 EST
        assert b.latest_closed_daily(s).key == "daily:2026-11-24"
    with freeze_time("2026-11-25 12:30:00"):  # 07:30:00 EST
        assert b.latest_closed_daily(s).key == "daily:2026-11-25"
        assert b.next_daily(s).key == "daily:2026-11-26"


def test_daily_window_across_dst_changes(make_settings: Any) -> None:
    s = make_settings(digest_time="07:30", digest_timezone="America/New_York")
    # Spring forward (2026-03-08): 07:30 is EDT, 11:30Z, an hour earlier in UTC than the day before.
    assert b.daily_close(date(2026, 3, 7), s) == datetime(2026, 3, 7, 12, 30, tzinfo=UTC)
    with freeze_time("2026-03-08 11:29:59"):
        assert b.latest_closed_daily(s).key == "daily:2026-03-07"
    with freeze_time("2026-03-08 11:30:00"):
        assert b.latest_closed_daily(s).key == "daily:2026-03-08"
    # Fall back (2026-11-01): 07:30 is EST again, 12:30Z.
    with freeze_time("2026-11-01 12:29:59"):
        assert b.latest_closed_daily(s).key == "daily:2026-10-31"
    with freeze_time("2026-11-01 12:30:00"):
        assert b.latest_closed_daily(s).key == "daily:2026-11-01"

    # A wall time inside the gap or the overlap still closes each day exactly once.
    for hhmm, day, expected in (("02:30", date(2026, 3, 8), datetime(2026, 3, 8, 7, 30)),
                                ("01:30", date(2026, 11, 1), datetime(2026, 11, 1, 5, 30))):
        odd = make_settings(digest_time=hhmm, digest_timezone="America/New_York")
        assert b.daily_close(day, odd) == expected.replace(tzinfo=UTC)
        keys = []
        t = datetime.combine(day - timedelta(days=1), datetime.min.time(), tzinfo=UTC)
        while t < datetime.combine(day + timedelta(days=2), datetime.min.time(), tzinfo=UTC):
            keys.append(b.latest_closed_daily(odd, t).key)
            t += timedelta(minutes=15)
        distinct = list(dict.fromkeys(keys))
        assert distinct == sorted(distinct)  # never goes back
        assert f"daily:{day.isoformat()}" in distinct


def test_repeat_points_daily_then_weekly() -> None:
    first = datetime(2026, 11, 1, 15, tzinfo=UTC)
    listed = []
    for n in range(1, 30):
        end = datetime(2026, 11, 1, 12, 30, tzinfo=UTC) + timedelta(days=n)
        if b.repeat_due(first, end - timedelta(days=1), end):
            listed.append(end.day)
    assert listed == [3, 4, 5, 6, 7, 8, 9, 16, 23, 30]
    # A missed digest does not lose the weekly reminder: it lands in the next one.
    assert b.repeat_due(first, datetime(2026, 11, 15, tzinfo=UTC),
                        datetime(2026, 11, 17, tzinfo=UTC))


# -- the daily digest over SMTP ---------------------------------------------------------


def test_daily_digest_routes_groups_counts_and_steps(env: Any, smtp: SmtpSink) -> None:
    e = env()
    after_yesterday(e)
    h = timedelta(hours=1)
    e.add("authority_invalid", "open", NOW - 5 * h, patient="P101", contact="C201")
    e.add("authority_invalid", "open", NOW - 7 * h, patient="P102", contact="C202")
    e.add("self_role", "open", NOW - 3 * timedelta(days=1), patient="P103", contact="C203")
    e.add("welcome_not_sent", "pending", NOW - 2 * h, contact="C204")           # waiting
    e.add("contact_inactive", "silenced", NOW - 9 * h, patient="P105", contact="C205")
    e.add("patient_email_present", "resolved", NOW - 8 * h, patient="P106",
          resolved=CLOSE - h)                                                     # resolved
    e.add("portal_orphan_user", "open", NOW - 6 * h, user="U301")               # manager
    e.add("caregiver_link_missing", "escalated", NOW - 3 * timedelta(days=1),
          patient="P107", contact="C207", user="U307", changed=NOW - 2 * timedelta(days=1))
    e.add("contact_email_invalid", "open", NOW - 5 * h, contact="C208",
          detail="contact C208 has an email like <b>x</b> & more")
    e.add("contact_duplicate", "open", NOW + h, contact="C209", contacts=["C209", "C210"])

    results = e.send_due()
    assert sorted(r.status for r in results) == ["sent", "sent"]
    assert len(smtp.messages) == 2
    [fd] = smtp.to(FD)
    [pm] = smtp.to(PM)
    assert fd["To"] == FD and fd["From"] == "oprecon@practice.example"
    assert fd["Subject"] == "[oprecon] test: daily digest 2026-11-25: 3 new, 4 open, 1 resolved"
    assert fd.get_content_type() == "multipart/alternative"
    text, html = parts(fd)

    # Counts at the top, for this recipient's categories only.
    assert "New since the last digest:       3" in text
    assert "Still open:                      1 (oldest 3 days)" in text
    assert "Resolved since the last digest:  1" in text
    assert "Waiting on the portal delay:     1" in text
    assert "Silenced (not listed):           1" in text
    assert 'data-count="new">3<' in html

    # Grouped by check; each item with who, what and the next check; the steps the
    # items share are said once for them (forty new items are not forty copies).
    section = text.split("== Parent without portal authority (authority_invalid): 2 ==")[1]
    section = section.split("\n== ")[0]
    assert "chart P101, contact C201" in section and "chart P102, contact C202" in section
    assert section.count("What to do for each:") == 1
    assert section.count(REMEDIES["authority_invalid"][0]) == 1
    assert "oprecon checks again: on the next scan (every 5 minutes)" in section
    assert "[REMINDER] chart P103, contact C203" in text  # 3 days old: daily reminder
    assert "== Parent listed as Self on their own chart (self_role): 1 ==" in text

    # Left out: silenced, waiting, resolved before the close, seen after the close,
    # and the practice manager's checks.
    for absent in ("C205", "C204", "P106", "C209", "U301", "P107"):
        assert absent not in text, absent
    assert "like &lt;b&gt;x&lt;/b&gt; &amp; more" in html  # autoescaped
    assert "like <b>x</b> & more" in text

    pm_text, _ = parts(pm)
    assert "== Portal user with no matching OP record (portal_orphan_user): 1 ==" in pm_text
    assert "[ESCALATED] chart P107, contact C207, portal user U307" in pm_text
    assert ESCALATION[1] in pm_text
    assert "Escalated (contact OP support):  1" in pm_text
    assert "authority_invalid" not in pm_text

    rows = {r.window_key: r for r in e.rows() if r.status == "sent" and r.sent_at == NOW}
    assert rows["daily:2026-11-25"].items in (2, 4)


def test_resolved_before_the_window_closed_is_only_counted(env: Any, smtp: SmtpSink) -> None:
    e = env()
    after_yesterday(e)
    fp = e.add("authority_invalid", "resolved", PREV_CLOSE + timedelta(hours=3), patient="P1",
               contact="C1", resolved=CLOSE - timedelta(minutes=1))
    e.add("authority_invalid", "resolved", PREV_CLOSE + timedelta(hours=4), patient="P2",
          contact="C2", resolved=CLOSE + timedelta(minutes=5))  # after the close, before sending
    e.send_due()
    [fd] = smtp.to(FD)
    text, _ = parts(fd)
    assert "Resolved since the last digest:  1" in text
    assert fp not in text and "P1" not in text and "P2" not in text
    assert "Nothing needs your attention today." in text


def test_nothing_to_say_sends_nothing_but_records_the_window(env: Any, smtp: SmtpSink) -> None:
    e = env()
    after_yesterday(e)
    assert [r.status for r in e.send_due()] == ["empty", "empty"]
    assert smtp.messages == []
    assert send.due(e.settings, e.sessions, NOW) == []


def test_first_digest_summarises_the_backlog(env: Any, smtp: SmtpSink) -> None:
    e = env()
    for i in range(12):
        e.add("welcome_not_sent", "open", NOW - timedelta(days=i + 1, hours=2),
              contact=f"C{500 + i}")
    for i in range(3):
        e.add("patient_email_present", "open", NOW - timedelta(days=40), patient=f"P{700 + i}")
    e.send_due()
    [fd] = smtp.to(FD)
    assert fd["Subject"] == "[oprecon] test: first report 2026-11-25, 15 open item(s)"
    text, html = parts(fd)
    assert "FIRST REPORT" in text
    assert "== Welcome email never sent (welcome_not_sent): 12 open ==" in text
    assert "== Child's chart has a real email (patient_email_present): 3 open ==" in text
    listed = [f"C{500 + i}" for i in range(12) if f"contact C{500 + i}" in text]
    assert len(listed) == b.BACKLOG_EXAMPLES  # a few examples, not one item per record
    assert REMEDIES["welcome_not_sent"][1] in text
    assert "[NEW]" not in text and "[REMINDER]" not in text
    assert 'data-check="welcome_not_sent"' in html
    # The next day is an ordinary digest: nothing new, and the old items are not all repeated.
    smtp.messages.clear()
    later = NOW + timedelta(days=1)
    e.send_due(now=later)
    [fd2] = smtp.to(FD)
    assert "FIRST REPORT" not in parts(fd2)[0]


def test_repeats_daily_for_a_week_then_weekly(env: Any, smtp: SmtpSink) -> None:
    e = env(digest_recipients={"front_desk": [FD]})
    first = datetime(2026, 11, 1, 15, tzinfo=UTC)  # 10:00 EST
    e.mark_sent(FD, "daily:2026-10-31")
    e.add("authority_invalid", "open", first, patient="P1", contact="C1")
    [recipient] = b.resolve_recipients(e.settings)
    seen: dict[int, str] = {}
    for day in range(2, 24):
        with freeze_time(datetime(2026, 11, day, 12, 35, tzinfo=UTC)):
            window = b.latest_closed_daily(e.settings)
            with e.sessions() as s:
                digest = b.build_daily(s, e.settings, recipient, window)
        for group in digest.groups:
            for item in group.items:
                seen[day] = "new" if item.new else "repeat" if item.repeat else "?"
        e.mark_sent(FD, window.key)
    assert seen == {2: "new", **{d: "repeat" for d in range(3, 10)}, 16: "repeat",
                    23: "repeat"}


# -- immediate notices -----------------------------------------------------------------


def test_caregiver_link_stale_is_sent_once_at_once(env: Any, smtp: SmtpSink) -> None:
    e = env()
    after_yesterday(e)
    e.mark_sent(FD, "daily:2026-11-25")
    e.mark_sent(PM, "daily:2026-11-25")
    seen = NOW - timedelta(minutes=25)
    fp = e.add("caregiver_link_stale", "held", seen, severity="high", patient="P9",
               contact="C9", user="U9", changed=NOW - timedelta(minutes=5))
    due = send.due(e.settings, e.sessions, NOW)
    key = f"immediate:{fp}:{b.stamp(seen)}"
    assert due == [(b.recipient_key(PM), key)]  # the practice manager only
    assert e.send_due()[0].status == "sent"
    [pm] = smtp.messages
    assert pm[0] == [PM]
    msg = pm[1]
    assert msg["Subject"].startswith(
        "[oprecon] Action needed now: Portal shows a child to someone OP no longer authorizes")
    text, _ = parts(msg)
    assert REMEDIES["caregiver_link_stale"][0] in text and "portal user U9" in text
    # Later ticks, the fix's hold ending, a retry: nothing more.
    assert send.due(e.settings, e.sessions, NOW + timedelta(minutes=5)) == []
    again = send.deliver(e.settings, e.sessions, b.recipient_key(PM), key, now=NOW)
    assert again.status == "duplicate"
    assert len(smtp.messages) == 1


def test_an_id_with_control_characters_cannot_break_a_notice(env: Any, smtp: SmtpSink) -> None:
    """Issue 13 case 5: a CR/LF in an id made the subject header raise, the notice was
    stored as `unknown` and the tick's other deliveries were skipped. Ids are checked at
    every entry now; a row stored before that still goes out, one clean subject line."""
    e = env()
    after_yesterday(e)
    e.mark_sent(FD, "daily:2026-11-25")
    e.mark_sent(PM, "daily:2026-11-25")
    seen = NOW - timedelta(minutes=25)
    e.add("caregiver_link_stale", "held", seen, severity="high",
          patient="P9\r\nBcc: x@evil.example", contact="C9", user="U9\x1b[2J",
          changed=NOW - timedelta(minutes=5),
          detail="portal user U9\x1b[2J can still see patient P9\r\nBcc: x@evil.example")
    deliveries = e.send_due()
    assert [d.status for d in deliveries] == ["sent"]
    [(rcpts, msg)] = smtp.messages
    assert rcpts == [PM] and msg["Bcc"] is None
    assert "\r" not in msg["Subject"] and "\n" not in msg["Subject"]
    text, html = parts(msg)
    assert "\x1b" not in text and "\x1b" not in html


def test_immediate_notice_that_cleared_is_skipped(env: Any, smtp: SmtpSink) -> None:
    e = env()
    fp = e.add("caregiver_link_stale", "held", NOW - timedelta(minutes=20), severity="high",
               patient="P9", contact="C9", user="U9")
    key = f"immediate:{fp}:{b.stamp(NOW - timedelta(minutes=20))}"
    with e.sessions.begin() as s:
        row = s.scalar(select(FindingRow).where(FindingRow.fingerprint == fp))
        assert row is not None
        row.state = "resolved"
        row.resolved_at = NOW
    result = send.deliver(e.settings, e.sessions, b.recipient_key(PM), key, now=NOW)
    assert result.status == "skipped" and smtp.messages == []
    assert [r.status for r in e.rows()] == ["skipped"]


def test_system_notices_breaker_guard_deadman(env: Any, smtp: SmtpSink) -> None:
    e = env()
    after_yesterday(e)
    e.mark_sent(FD, "daily:2026-11-25")
    e.mark_sent(PM, "daily:2026-11-25")
    opened = NOW - timedelta(minutes=3)
    outage = NOW - timedelta(minutes=1)
    fp = e.add("welcome_not_sent", "open", NOW - timedelta(hours=2), contact="C1")
    with e.sessions.begin() as s:
        # The shapes worker.fixes.rails and worker.runtime.health write.
        kv_set(s, "test", "breaker", {"state": "open", "reason": "5/6 calls failed",
                                      "since": opened.isoformat()}, NOW)
        kv_set(s, "test", "deadman", {"overdue": True, "age_seconds": 7200,
                                      "at": outage.isoformat(), "alerted": False}, NOW)
        kv_set(s, "test", "guard", {"run_id": 42, "reason": "3 fixes exceed the guard",
                                    "staged": 3, "status": "pending"}, NOW)
        finding_id = s.scalar(select(FindingRow.id).where(FindingRow.fingerprint == fp))
        for i in range(3):
            s.add(ActionRow(practice="test", finding_id=finding_id, run_id=42,
                            kind="resend_welcome", idempotency_key=f"k{i}", params={},
                            status="staged", created_at=NOW - timedelta(minutes=1)))
    with e.sessions() as s:
        keys = [n.window_key for n in b.immediate_notices(s, e.settings, NOW)]
    assert keys == [  # oldest event first
        f"immediate:breaker:{b.stamp(opened)}",
        "immediate:guard:run42",
        f"immediate:deadman:{b.stamp(outage)}",
    ]
    # One delivery, named after the oldest, carries all three to the manager.
    assert send.due(e.settings, e.sessions, NOW) == [(b.recipient_key(PM), keys[0])]
    e.send_due()
    [(rcpts, msg)] = smtp.messages
    assert rcpts == [PM]
    assert msg["Subject"] == ("[oprecon] Action needed now: 3 problems (oprecon stopped "
                              "changing the portal and 2 other kinds)")
    text = parts(msg)[0]
    for title in ("OPRECON STOPPED CHANGING THE PORTAL", "A LARGE BATCH OF FIXES IS WAITING "
                  "FOR APPROVAL", "OPRECON HAS STOPPED CHECKING"):
        assert f"!! {title}" in text
    assert "oprecon fixes approve 42" in text and "3 portal record(s)" in text
    assert "oprecon fixes show 42" in text
    assert "The guard's reason: 3 fixes exceed the guard." in text
    assert {r.window_key: r.status for r in e.rows() if r.window_key in keys} == dict.fromkeys(
        keys, "sent")
    assert send.due(e.settings, e.sessions, NOW + timedelta(minutes=10)) == []
    with e.sessions() as s:
        assert kv_get(s, "test", "deadman")["alerted"] is True  # told staff: health shows it
    # The next daily digest still carries them, for the manager only.
    smtp.messages.clear()
    e.send_due(now=NOW + timedelta(days=1))
    [daily] = smtp.to(PM)
    text = parts(daily)[0]
    assert "!! OPRECON STOPPED CHANGING THE PORTAL" in text
    assert "!! A LARGE BATCH OF FIXES IS WAITING FOR APPROVAL" in text
    assert "OPRECON STOPPED" not in parts(smtp.to(FD)[0])[0]


def test_deadman_notice_says_how_long_and_an_all_clear_follows_the_recovery(
    env: Any, smtp: SmtpSink
) -> None:
    """Issue 16 #5: the notice counts from the last successful scan (not "0.0 hours"),
    and when scans succeed again the manager hears so, once."""
    from worker.runtime import health

    e = env()
    after_yesterday(e)
    e.mark_sent(FD, "daily:2026-11-25")
    e.mark_sent(PM, "daily:2026-11-25")
    last_ok = NOW - timedelta(minutes=47)
    with e.sessions.begin() as s:
        kv_set(s, "test", "last_success", {"at": last_ok.isoformat(), "run_id": 7,
                                           "kind": "incremental"}, last_ok)
    with freeze_time(last_ok + timedelta(minutes=10)):  # exactly two intervals: still fine
        assert health.run_deadman(e.settings, e.sessions)["overdue"] is False
    with freeze_time(last_ok + timedelta(minutes=10, seconds=1)):
        assert health.run_deadman(e.settings, e.sessions)["overdue"] is True

    e.send_due(now=NOW)
    [(rcpts, msg)] = smtp.messages
    assert rcpts == [PM]
    text = parts(msg)[0]
    assert "No reconciliation has finished for 47 minutes." in text, text

    back = NOW + timedelta(minutes=2)
    with e.sessions.begin() as s:
        kv_set(s, "test", "last_success", {"at": back.isoformat(), "run_id": 8,
                                           "kind": "incremental"}, back)
    with freeze_time(NOW + timedelta(minutes=5)):
        value = health.run_deadman(e.settings, e.sessions)
    assert value["overdue"] is False and value["recovered_alerted"] is True
    smtp.messages.clear()
    e.send_due(now=NOW + timedelta(minutes=5))
    [(rcpts, msg)] = smtp.messages
    assert rcpts == [PM]
    assert msg["Subject"] == "[oprecon] All clear: oprecon is checking again"
    assert "no run finished for about 49 minutes" in parts(msg)[0]
    # Told once: later ticks and the next deadman checks send nothing more.
    with freeze_time(NOW + timedelta(minutes=10)):
        assert health.run_deadman(e.settings, e.sessions)["overdue"] is False
    assert send.due(e.settings, e.sessions, NOW + timedelta(minutes=10)) == []


def test_no_all_clear_for_an_outage_nobody_was_told_about(env: Any, smtp: SmtpSink) -> None:
    from worker.runtime import health

    e = env()
    last_ok = NOW - timedelta(minutes=12)
    with e.sessions.begin() as s:
        kv_set(s, "test", "last_success", {"at": last_ok.isoformat(), "run_id": 7}, last_ok)
    with freeze_time(NOW - timedelta(minutes=1)):
        assert health.run_deadman(e.settings, e.sessions)["overdue"] is True
    with e.sessions.begin() as s:  # scans came back before any notice went out
        kv_set(s, "test", "last_success", {"at": NOW.isoformat(), "run_id": 8}, NOW)
    with freeze_time(NOW):
        assert health.run_deadman(e.settings, e.sessions)["recovered_alerted"] is False
    with e.sessions() as s:
        keys = [n.window_key for n in b.immediate_notices(s, e.settings, NOW)]
    assert not [k for k in keys if "deadman" in k]


def test_a_missed_nightly_full_scan_is_an_immediate_notice_once(
    env: Any, smtp: SmtpSink
) -> None:
    """Issue 18: a deferred full scan past its deadline alerts staff (the shape
    worker.runtime.deferral writes), once per deferral, and not once it has run."""
    e = env()
    after_yesterday(e)
    e.mark_sent(FD, "daily:2026-11-25")
    e.mark_sent(PM, "daily:2026-11-25")
    since = NOW - timedelta(hours=5)
    with e.sessions.begin() as s:
        kv_set(s, "test", "full_scan_deferred", {
            "since": since.isoformat(), "deadline": (since + timedelta(hours=4)).isoformat(),
            "attempts": 31, "reason": "another scan of practice test is running",
            "holder": "vm pid 4242", "alerted_at": (NOW - timedelta(minutes=1)).isoformat(),
        }, NOW)
    with e.sessions() as s:
        keys = [n.window_key for n in b.immediate_notices(s, e.settings, NOW)]
    assert keys == [f"immediate:fullscan:{b.stamp(since)}"]
    e.send_due()
    [(rcpts, msg)] = smtp.messages
    assert rcpts == [PM]
    text = parts(msg)[0]
    assert "!! LAST NIGHT'S FULL CHECK DID NOT RUN" in text
    assert "oprecon status" in text and "4242" not in text  # no lock holder for staff
    assert send.due(e.settings, e.sessions, NOW + timedelta(minutes=10)) == []
    # Once it has run (the record is gone), nothing more is said.
    with e.sessions.begin() as s:
        s.execute(delete(KeyValue).where(KeyValue.key == "full_scan_deferred"))
    with e.sessions() as s:
        assert b.immediate_notices(s, e.settings, NOW + timedelta(hours=1)) == []


# -- exactly once ------------------------------------------------------------------------


def test_deliver_retried_sends_one_message(env: Any, smtp: SmtpSink) -> None:
    e = env()
    e.add("authority_invalid", "open", NOW - timedelta(hours=2), patient="P1", contact="C1")
    key = b.recipient_key(FD)
    first = send.deliver(e.settings, e.sessions, key, "daily:2026-11-25", now=NOW)
    second = send.deliver(e.settings, e.sessions, key, "daily:2026-11-25", now=NOW)
    assert (first.status, second.status) == ("sent", "duplicate")
    assert len(smtp.messages) == 1


def _race(e: Env, key: str, window: str) -> list[str]:
    barrier = threading.Barrier(2)
    out: list[str] = []

    def run() -> None:
        barrier.wait()
        out.append(send.deliver(e.settings, e.sessions, key, window, now=NOW).status)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return sorted(out)


def test_two_racing_workers_send_one_message(env: Any, smtp: SmtpSink) -> None:
    e = env()
    e.add("authority_invalid", "open", NOW - timedelta(hours=2), patient="P1", contact="C1")
    assert _race(e, b.recipient_key(FD), "daily:2026-11-25") == ["duplicate", "sent"]
    assert len(smtp.messages) == 1


@pytest.mark.services
def test_two_racing_workers_send_one_message_on_postgresql(
    env: Any, smtp: SmtpSink, pg_database: str
) -> None:
    migrate(pg_database)
    e = env(state_db_url=pg_database, practice="race-pg")
    e.add("authority_invalid", "open", NOW - timedelta(hours=2), patient="P1", contact="C1")
    assert _race(e, b.recipient_key(FD), "daily:2026-11-25") == ["duplicate", "sent"]
    assert len(smtp.messages) == 1


def test_transient_smtp_errors_are_retried_then_sent_once(env: Any, smtp: SmtpSink) -> None:
    e = env()
    e.add("authority_invalid", "open", NOW - timedelta(hours=2), patient="P1", contact="C1")
    key = b.recipient_key(FD)
    smtp.fail_next = ["451 4.3.0 try again later"] * 3  # every in-process attempt
    with pytest.raises(send.TransientDeliveryError):
        send.deliver(e.settings, e.sessions, key, "daily:2026-11-25", now=NOW, final=False,
                     sleep=lambda _: None)
    assert [r.status for r in e.rows()] == ["retrying"]
    smtp.fail_next = ["451 4.3.0 once more"]  # the Celery retry: one more 4xx, then accepted
    result = send.deliver(e.settings, e.sessions, key, "daily:2026-11-25", now=NOW,
                          final=False, sleep=lambda _: None)
    assert result.status == "sent" and len(smtp.messages) == 1
    assert [r.status for r in e.rows()] == ["sent"]


def test_permanent_smtp_error_is_failed_not_retried(env: Any, smtp: SmtpSink) -> None:
    e = env()
    e.add("authority_invalid", "open", NOW - timedelta(hours=2), patient="P1", contact="C1")
    smtp.fail_next = [f"554 5.7.1 rejected for {FD}"]
    result = send.deliver(e.settings, e.sessions, b.recipient_key(FD), "daily:2026-11-25",
                          now=NOW, final=False)
    assert result.status == "failed" and smtp.messages == []
    [row] = e.rows()
    assert row.status == "failed" and FD not in (row.error or "")


def test_connection_lost_after_data_is_unknown_not_resent(env: Any, smtp: SmtpSink) -> None:
    e = env()
    e.add("authority_invalid", "open", NOW - timedelta(hours=2), patient="P1", contact="C1")
    smtp.fail_next = ["DROP"]
    key = b.recipient_key(FD)
    result = send.deliver(e.settings, e.sessions, key, "daily:2026-11-25", now=NOW,
                          final=False, sleep=lambda _: None)
    assert result.status == "unknown"  # no exception: nothing for Celery to retry
    assert send.deliver(e.settings, e.sessions, key, "daily:2026-11-25", now=NOW).status == (
        "duplicate")
    assert len(smtp.messages) == 1 and [r.status for r in e.rows()] == ["unknown"]


def test_unreachable_smtp_is_transient(env: Any) -> None:
    e = env(smtp_port=_free_port())
    e.add("authority_invalid", "open", NOW - timedelta(hours=2), patient="P1", contact="C1")
    result = send.deliver(e.settings, e.sessions, b.recipient_key(FD), "daily:2026-11-25",
                          now=NOW, final=True, sleep=lambda _: None)
    assert result.status == "failed" and "connect" in result.reason


def test_smtp_login(env: Any, smtp: SmtpSink) -> None:
    """AUTH over a plain loopback connection (STARTTLS: the test below)."""
    seen: list[str] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        seen.append(auth_data.login.decode())
        return AuthResult(success=auth_data.password == b"s3cret")

    port = _free_port()
    controller = Controller(smtp, hostname="127.0.0.1", port=port, authenticator=authenticator,
                            auth_require_tls=False)
    controller.start()
    try:
        e = env(smtp_port=port, smtp_user="oprecon", smtp_password="s3cret")
        e.add("authority_invalid", "open", NOW - timedelta(hours=2), patient="P1",
              contact="C1")
        result = send.deliver(e.settings, e.sessions, b.recipient_key(FD), "daily:2026-11-25",
                              now=NOW)
    finally:
        stop_smtp(controller)
    assert result.status == "sent" and seen == ["oprecon"]


@pytest.fixture(scope="module")
def relay_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "relay.pem", d / "relay.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def test_starttls_then_login_verified_against_the_relay_certificate(
    env: Any, smtp: SmtpSink, relay_cert: tuple[Path, Path]
) -> None:
    """The relay demands STARTTLS before AUTH; oprecon upgrades, verifies the certificate
    against `smtp_ca_file`, logs in and delivers. An unverifiable certificate is refused."""
    cert, key = relay_cert
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    secured: list[bool] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        secured.append(session.ssl is not None)
        return AuthResult(success=auth_data.password == b"s3cret")

    port = _free_port()
    controller = Controller(smtp, hostname="127.0.0.1", port=port, tls_context=server_tls,
                            require_starttls=True, auth_require_tls=True,
                            authenticator=authenticator)
    controller.start()
    try:
        common = dict(smtp_port=port, smtp_starttls=True, smtp_user="oprecon",
                      smtp_password="s3cret")
        untrusted = env(**common)
        untrusted.add("authority_invalid", "open", NOW - timedelta(hours=2), patient="P1",
                      contact="C1")
        refused = send.deliver(untrusted.settings, untrusted.sessions, b.recipient_key(FD),
                               "daily:2026-11-25", now=NOW, final=True,
                               sleep=lambda _: None)
        assert refused.status == "failed" and smtp.messages == []

        e = env(**common, smtp_ca_file=str(cert))
        e.add("authority_invalid", "open", NOW - timedelta(hours=2), patient="P1",
              contact="C1")
        result = send.deliver(e.settings, e.sessions, b.recipient_key(FD), "daily:2026-11-25",
                              now=NOW)
    finally:
        stop_smtp(controller)
    assert result.status == "sent" and secured == [True]
    assert [rcpts for rcpts, _ in smtp.messages] == [[FD]]


def test_implicit_tls_relay(env: Any, smtp: SmtpSink, relay_cert: tuple[Path, Path]) -> None:
    """`smtp_ssl`: TLS from the first byte (port 465 style), certificate verified."""
    cert, key = relay_cert
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    port = _free_port()
    controller = Controller(smtp, hostname="127.0.0.1", port=port, ssl_context=server_tls)
    controller.start()
    try:
        e = env(smtp_port=port, smtp_ssl=True, smtp_ca_file=str(cert))
        e.add("authority_invalid", "open", NOW - timedelta(hours=2), patient="P1",
              contact="C1")
        result = send.deliver(e.settings, e.sessions, b.recipient_key(FD), "daily:2026-11-25",
                              now=NOW)
    finally:
        stop_smtp(controller)
    assert result.status == "sent"
    assert [rcpts for rcpts, _ in smtp.messages] == [[FD]]


def test_stuck_sending_row_becomes_unknown_and_is_not_resent(env: Any, smtp: SmtpSink) -> None:
    e = env(digest_recipients={"front_desk": [FD]})
    e.mark_sent(FD, "daily:2026-11-23", created=PREV_CLOSE - timedelta(days=1))
    e.mark_sent(FD, "daily:2026-11-24", status="sending", created=PREV_CLOSE)
    e.add("authority_invalid", "open", PREV_CLOSE - timedelta(hours=2), patient="P1",
          contact="C1")
    with capture_logs():
        pairs = send.tick(e.settings, e.sessions, NOW)
    assert pairs == [(b.recipient_key(FD), "daily:2026-11-25")]  # not daily:2026-11-24
    assert {r.window_key: r.status for r in e.rows()}["daily:2026-11-24"] == "unknown"
    e.send_due()
    [msg] = smtp.messages
    text, _ = parts(msg[1])
    assert "NOTE: the digest for 2026-11-24 may not have reached you" in text
    # It re-covers the uncertain day: the item is "new" since the last certain digest.
    assert "[NEW] chart P1, contact C1" in text


# -- names -----------------------------------------------------------------------------


def test_names_only_when_configured(env: Any, smtp: SmtpSink) -> None:
    records = [
        factory.patient("P1", first_name="Zebulon", last_name="Quixwhistle"),
        factory.contact("C1", first_name="Marigold", last_name="Fennimore"),
    ]
    loader = send.names_from_op(factory.MemorySource(records))
    for show in (False, True):
        smtp.messages.clear()
        e = env(digest_show_names=show)
        after_yesterday(e)
        e.add("authority_invalid", "open", NOW - timedelta(hours=2), patient="P1",
              contact="C1", detail="Mother on chart P1 (marigold@example.org) has authority None")
        for r, w in send.tick(e.settings, e.sessions, NOW):
            send.deliver(e.settings, e.sessions, r, w, now=NOW, names_loader=loader)
        [(_, msg)] = smtp.messages
        raw = msg.as_string()
        text, html = parts(msg)
        for body in (text, html):
            for name in ("Zebulon", "Quixwhistle", "Marigold", "Fennimore"):
                assert (name in body) is show, (show, name)
        if not show:
            assert "marigold@example.org" not in raw
        else:
            assert "chart P1 (Zebulon Quixwhistle), contact C1 (Marigold Fennimore)" in text


# -- webhook ---------------------------------------------------------------------------


def test_webhook_gets_one_json_post_per_window(env: Any, webhook: HookSink,
                                               smtp: SmtpSink) -> None:
    e = env(digest_recipients={}, webhook_url=f"http://127.0.0.1:{webhook.port}/hook",
            digest_show_names=True)
    e.mark_sent("webhook", "daily:2026-11-24", created=PREV_CLOSE)
    e.add("authority_invalid", "open", NOW - timedelta(hours=2), patient="P1", contact="C1")
    e.add("portal_orphan_user", "open", NOW - timedelta(hours=2), user="U7")
    webhook.statuses = [503]  # one transient failure, retried in-process
    names_used: list[int] = []

    def loader(p: set[str], c: set[str]) -> dict[str, str]:
        names_used.append(1)
        return {"patient:P1": "Zebulon Quixwhistle"}

    results = [send.deliver(e.settings, e.sessions, r, w, now=NOW, names_loader=loader,
                            sleep=lambda _: None)
               for r, w in send.tick(e.settings, e.sessions, NOW)]
    assert [r.status for r in results] == ["sent"]
    [body] = webhook.bodies
    assert body["text"].startswith("[oprecon] test: daily digest 2026-11-25: 2 new")
    assert body["blocks"][0]["type"] == "header"
    sections = " ".join(blk["text"]["text"] for blk in body["blocks"] if blk["type"] == "section")
    assert "authority_invalid" in sections and "portal_orphan_user" in sections
    assert "Zebulon" not in json.dumps(body) and names_used == []  # ids only on webhooks
    assert e.rows()[-1].channel == "webhook"
    again = send.deliver(e.settings, e.sessions, "webhook", "daily:2026-11-25", now=NOW)
    assert again.status == "duplicate" and len(webhook.bodies) == 1 and smtp.messages == []


# -- CLI and the example ---------------------------------------------------------------


def test_preview_renders_without_writing(env: Any, smtp: SmtpSink, tmp_path: Path) -> None:
    e = env()
    after_yesterday(e)
    e.add("authority_invalid", "open", NOW - timedelta(hours=2), patient="P1", contact="C1")
    out = io.StringIO()
    html = tmp_path / "preview.html"
    digest_command(e.settings, preview=True, html=html, now=NOW, out=out)
    text = out.getvalue()
    assert ("===== front_desk (1 recipient): daily:2026-11-25, goes out 2026-11-25 07:30 EST "
            "=====") in text
    # Nothing for the manager in the closed window: the next one, as it stands now.
    assert ("===== practice_manager (1 recipient): daily:2026-11-26, goes out 2026-11-26 "
            "07:30 EST (empty so far: nothing would be sent) =====") in text
    assert "chart P1, contact C1" in text and FD not in text
    # --html FILE writes FILE (the first group), then FILE-2.html.
    assert html.read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "preview-2.html").read_text().startswith("<!DOCTYPE html>")
    assert not (tmp_path / "preview-1.html").exists()
    assert f"HTML for front_desk (1 recipient) written to {html}" in text
    with e.sessions() as s:
        assert s.scalar(select(func.count()).select_from(DigestSent)) == 2  # only yesterday's
    assert smtp.messages == []


def test_preview_right_after_deployment_shows_what_the_next_digest_will_carry(
    env: Any, smtp: SmtpSink, tmp_path: Path
) -> None:
    """Issue 16 #8: deployed at 07:35, after the window closed at 07:30; the first scans
    find problems. The preview must show them in the digest that goes out next, not the
    closed window as "nothing would be sent"."""
    e = env(digest_recipients={"front_desk": [FD]})
    first_scan = NOW - timedelta(minutes=5)
    for n in range(3):
        e.add("authority_invalid", "open", first_scan, patient=f"P{n}", contact=f"C{n}")
    out = io.StringIO()
    page = tmp_path / "next.html"
    digest_command(e.settings, preview=True, html=page, now=NOW, out=out)
    text = out.getvalue()
    # Examples stay apart in HTML as in text: "|" between families, ";" within one.
    assert "chart P0; contact C0 | chart P1; contact C1" in page.read_text()
    header = next(ln for ln in text.splitlines() if ln.startswith("====="))
    assert "nothing would be sent" not in header, text
    assert "first report 2026-11-26, 3 open item(s)" in text  # the first digest it sends
    assert "(authority_invalid): 3 open" in text and "chart P2; contact C2" in text


def test_steps_point_at_ids_when_the_digest_hides_names(env: Any, smtp: SmtpSink) -> None:
    """Issue 16 #9: "search by last name" is no help in a digest that shows no names."""
    e = env(digest_recipients={"front_desk": [FD]})
    after_yesterday(e)
    e.add("contact_inactive", "open", NOW - timedelta(hours=2), patient="P1", contact="C1")
    out = io.StringIO()
    digest_command(e.settings, preview=True, now=NOW, out=out)
    text = out.getvalue()
    assert "contact C1" in text
    assert "last name" not in text
    assert "search by the contact id shown above, then" not in text
    assert "Contact Manager and search by the contact id shown above." in text


def test_cli_without_preview_sends_what_is_due(env: Any, smtp: SmtpSink) -> None:
    e = env()
    after_yesterday(e)
    e.add("authority_invalid", "open", NOW - timedelta(hours=2), patient="P1", contact="C1")
    out = io.StringIO()
    digest_command(e.settings, now=NOW, out=out)
    assert "daily:2026-11-25 → front_desk #1: sent" in out.getvalue()
    assert len(smtp.messages) == 1


def test_render_example(tmp_path: Path) -> None:
    path = render_example(tmp_path / "example.html")
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>")
    for check in ("authority_invalid", "self_role", "contact_duplicate", "caregiver_link_missing"):
        assert f'data-check="{check}"' in html
    assert 'data-note="guard"' in html and "example.invalid" not in html


# -- the Celery tasks, in a real worker (thin: keys in, logic in worker.digest) -----------


@pytest.fixture(params=["sqlite", "postgresql"])
def worker_state_db(request: pytest.FixtureRequest, template_db: Path, tmp_path: Path) -> str:
    """A state database the test and a worker process share: a SQLite file, or the
    session's PostgreSQL database (each test uses a practice of its own in it)."""
    if request.param == "sqlite":
        db = tmp_path / "worker-state.sqlite"
        shutil.copy(template_db, db)
        return f"sqlite:///{db}"
    url: str = request.getfixturevalue("pg_database")
    migrate(url)
    return url


@pytest.mark.services
def test_a_deferred_digest_is_retried_by_the_worker_and_arrives_once(
    worker_state_db: str, smtp: SmtpSink, make_settings: Any, tmp_path: Path
) -> None:
    """The relay defers (451) every SMTP try of the deliver task's first run, so the task
    gives up in-process and Celery retries it with backoff; the relay accepts the retry.
    A real `celery worker` runs the tick and the delivery, against a private redis-server:
    one message, one `sent` row, delivered within the first retry's backoff (seconds), not
    when the broker would redeliver the message (the visibility timeout, hours)."""
    from config.schedule import beat_schedule
    from tasks import digests

    practice = f"digest-{uuid.uuid4().hex[:6]}"
    settings = make_settings(
        state_db_url=worker_state_db, practice=practice,
        digest_recipients={"front_desk": [FD]}, digest_time="07:30",
        digest_timezone="America/New_York", smtp_host="127.0.0.1", smtp_port=smtp.port,
        smtp_sender="oprecon@practice.example",
    )
    engine = make_engine(worker_state_db)
    e = Env(settings, session_factory(engine))
    e.add("authority_invalid", "open", datetime.now(UTC) - timedelta(days=2),
          patient="P1", contact="C1")

    def rows() -> list[DigestSent]:
        with e.sessions() as s:
            return list(s.scalars(select(DigestSent).where(DigestSent.practice == practice)))

    [(key, window)] = send.due(settings, e.sessions)  # one daily digest, nothing else
    smtp.fail_next = ["451 4.3.0 try again later"] * send.ATTEMPTS  # the whole first run
    in_process = send.BACKOFF * (2 ** (send.ATTEMPTS - 1) - 1)  # its sleeps: 2 + 4 s

    server = RedisServer(tmp_path / "redis", appendonly=False)
    worker = CeleryWorker(tmp_path, base_env(
        OPRECON_STATE_DB_URL=worker_state_db, OPRECON_PRACTICE=practice,
        OPRECON_BROKER_URL=server.url(0), OPRECON_REDIS_URL=server.url(1),
        OPRECON_DIGEST_RECIPIENTS=json.dumps({"front_desk": [FD]}),
        OPRECON_DIGEST_TIME="07:30", OPRECON_DIGEST_TIMEZONE="America/New_York",
        OPRECON_SMTP_HOST="127.0.0.1", OPRECON_SMTP_PORT=str(smtp.port),
        OPRECON_SMTP_SENDER="oprecon@practice.example", OPRECON_METRICS_PORT="0",
        OPRECON_LOG_FORMAT="json", OPRECON_LOG_LEVEL="INFO",
    ), name="digest")
    broker: Any = None
    try:
        server.start()
        broker = server.client(0)
        worker.start(queues="digest").wait_ready()
        assert beat_schedule(settings)["digest-tick"]["task"] == digests.tick.name
        send_task(server.url(0), digests.tick.name)  # what beat sends every 5 minutes

        def delivered() -> bool:
            worker.check_alive()
            return bool(smtp.messages)

        wait_for(delivered, in_process + digests.deliver.retry_backoff + 30,
                 "the digest to arrive after a retry", every=0.1)

        def settled() -> bool:
            """Nothing left to run: the row is final and no message is queued or held."""
            return (any(r.status not in ("sending", "retrying") for r in rows())
                    and broker.llen("digest") == 0 and not broker.hlen("unacked"))

        wait_for(settled, 30, "the delivery to be recorded and the queue empty", every=0.1)
        recorded = rows()
    finally:
        worker.stop()
        if broker is not None:
            broker.close()
        server.stop()
        engine.dispose()

    # Exactly once: one message, one row for (recipient, window), recorded as sent.
    assert len(smtp.messages) == 1 and smtp.to(FD)
    [row] = recorded
    assert (row.recipient, row.window_key, row.status) == (key, window, "sent")
    assert row.sent_at is not None and row.error is None
    # After a retry: every try of the first run was deferred, then Celery retried the same
    # task (not a new one, not a redelivery) after its backoff, and that try was accepted.
    assert len(smtp.attempts) == send.ATTEMPTS + 1
    events = worker.events()

    def named(name: str) -> list[dict[str, Any]]:
        return [ev for ev in events if ev.get("event") == name]

    [retrying], [sent] = named("digest_retrying"), named("digest_sent")
    assert retrying["task_id"] == sent["task_id"] and events.index(retrying) < events.index(sent)
    assert retrying["window_key"] == sent["window_key"] == window
    task_id = sent["task_id"]
    [retry] = [ev["event"] for ev in events if f"[{task_id}] retry: Retry in" in ev["event"]]
    countdown = int(re.search(r"Retry in (\d+)s", retry).group(1))  # type: ignore[union-attr]
    assert smtp.attempts[-1] - smtp.attempts[-2] >= countdown - 0.5
    # Within the retry's backoff, far below the redelivery the visibility timeout allows.
    waited = smtp.attempts[-1] - smtp.attempts[0]
    assert in_process <= waited <= in_process + digests.deliver.retry_backoff + 15
    assert waited < settings.broker_visibility_timeout_seconds / 25
    # Keys only in the task messages (as the worker received them) and no address logged.
    received = [ev["data"]["args"] for ev in events
                if ev["event"] == f"Task oprecon.digest.deliver[{task_id}] received"]
    assert len(received) == 2 and all(key in args and "@" not in args for args in received)
    assert "@" not in key and FD not in worker.log()


# -- immediate notices due together: one message per recipient ---------------------------

PM2 = "deputy@example.org"
STALE_TITLE = "Portal shows a child to someone OP no longer authorizes"


def stale_links(e: Env, n: int, seen: datetime = NOW - timedelta(minutes=20), *,
                first: int = 1, detail: str = "", changed: datetime | None = None) -> list[str]:
    """`n` stale caregiver links whose fixes are on hold; their immediate notice keys."""
    keys = []
    for i in range(first, first + n):
        at = seen + timedelta(seconds=i)
        fp = e.add("caregiver_link_stale", "held", at, severity="high", patient=f"P{900 + i}",
                   contact=f"C{900 + i}", user=f"U{900 + i}",
                   changed=changed or max(at, NOW - timedelta(minutes=5)),
                   detail=detail or f"portal user U{900 + i} (contact C{900 + i}) can still "
                                    f"see patient P{900 + i}, whom OP no longer authorizes")
        keys.append(f"immediate:{fp}:{b.stamp(at)}")
    return keys


def fp_of(key: str) -> str:
    """The fingerprint in `immediate:<fingerprint>:<stamp>` (fingerprints hold colons)."""
    return key.removeprefix("immediate:").rpartition(":")[0]


def references(text: str) -> list[str]:
    return [line.split("Reference: ")[1] for line in text.splitlines() if "Reference: " in line]


def quiet_day(e: Env, *addresses: str) -> None:
    """Yesterday's and today's daily digests went out: only immediate notices are due."""
    for address in addresses:
        e.mark_sent(address, "daily:2026-11-24", created=PREV_CLOSE)
        e.mark_sent(address, "daily:2026-11-25", created=CLOSE)


@pytest.mark.parametrize("show_names", [False, True])
def test_notices_due_together_are_one_message_per_recipient(
    env: Any, smtp: SmtpSink, show_names: bool
) -> None:
    e = env(digest_recipients={"front_desk": [FD], "practice_manager": [PM, PM2]},
            digest_show_names=show_names)
    quiet_day(e, FD, PM, PM2)
    keys = stale_links(e, 4, detail="the parent (marigold@example.org, born 2016-02-03) can "
                                    "still see the child")
    esc_at = NOW - timedelta(minutes=8)
    esc = e.add("caregiver_link_missing", "escalated", NOW - timedelta(days=2), patient="P301",
                contact="C301", user="U301", changed=esc_at)
    keys.append(f"immediate:{esc}:{b.stamp(esc_at)}")
    opened = NOW - timedelta(minutes=3)
    with e.sessions.begin() as s:
        kv_set(s, "test", "breaker", {"state": "open", "since": opened.isoformat()}, NOW)
    keys.append(f"immediate:breaker:{b.stamp(opened)}")
    # Older than the 24-hour look-back: left to the daily digest, not bundled.
    old = stale_links(e, 1, NOW - timedelta(hours=25), first=50,
                      changed=NOW - timedelta(hours=25))
    records = [factory.patient("P901", first_name="Zebulon", last_name="Quixwhistle"),
               factory.contact("C901", first_name="Marigold", last_name="Fennimore")]

    pairs = send.tick(e.settings, e.sessions, NOW)
    assert pairs == [(b.recipient_key(PM), keys[0]), (b.recipient_key(PM2), keys[0])]
    loader = send.names_from_op(factory.MemorySource(records))
    results = [send.deliver(e.settings, e.sessions, r, w, now=NOW, names_loader=loader)
               for r, w in pairs]
    assert [(r.status, r.items, r.notices) for r in results] == [("sent", 6, 6)] * 2

    assert sorted(rcpts[0] for rcpts, _ in smtp.messages) == sorted([PM, PM2])  # not FD
    for address in (PM, PM2):
        [msg] = smtp.to(address)
        assert msg["Subject"] == ("[oprecon] Action needed now: 6 problems (oprecon stopped "
                                  "changing the portal and 2 other kinds)")
        assert msg["X-Oprecon-Notices"] == "6"
        text, html = parts(msg)
        assert "These 6 problems could not wait for the daily digest." in text
        summary = text.replace("\r\n", "\n").split("SUMMARY\n")[1].split("\n\n")[0]
        assert summary.splitlines() == [
            "     1  oprecon stopped changing the portal (breaker)",
            f"     4  {STALE_TITLE} (caregiver_link_stale)",
            "     1  Parent cannot see their child in the portal (caregiver_link_missing), "
            "1 escalated",
        ]
        assert 'data-count="caregiver_link_stale">4<' in html
        # Grouped by check, high severity first; the steps and the next check once for
        # the items that share them, then who each one is for.
        assert text.index("!! OPRECON STOPPED") < text.index("(caregiver_link_stale): 4 ==")
        stale = text.split(f"== {STALE_TITLE} (caregiver_link_stale): 4 ==")[1]
        stale = stale.split("\n== ")[0]
        for i in range(1, 5):
            assert f"chart P{900 + i}" in stale and f"portal user U{900 + i}" in stale
        assert "[NEW] 4 items with the same steps" in stale
        assert stale.count("What to do for each:") == 1
        assert stale.count(REMEDIES["caregiver_link_stale"][0]) == 1
        assert stale.count("oprecon checks again: ") == 1
        assert "[ESCALATED] chart P301, contact C301, portal user U301" in text
        assert ESCALATION[1] in text
        assert sorted(references(text)) == sorted(fp_of(k) for k in keys[:5])
        assert fp_of(old[0]) not in text
        # Names, and the details as OP wrote them, only when the setting allows.
        for phi in ("Zebulon", "Quixwhistle", "Marigold", "Fennimore", "2016-02-03"):
            assert (phi in text) is show_names and (phi in html) is show_names, phi
        if show_names:
            assert "chart P901 (Zebulon Quixwhistle), contact C901 (Marigold Fennimore)" in text

    with e.sessions() as s:
        rows = s.scalars(select(DigestSent).where(DigestSent.window_key.in_(keys + old)))
        got = sorted((r.recipient, r.window_key, r.status, r.items) for r in rows)
    assert got == sorted((b.recipient_key(a), k, "sent", 1) for a in (PM, PM2) for k in keys)
    assert send.due(e.settings, e.sessions, NOW + timedelta(minutes=5)) == []


def test_a_bundle_of_one_reads_like_a_single_notice(env: Any, smtp: SmtpSink) -> None:
    e = env()
    quiet_day(e, FD, PM)
    [key] = stale_links(e, 1)
    e.send_due()
    [(_, msg)] = smtp.messages
    assert msg["Subject"] == f"[oprecon] Action needed now: {STALE_TITLE} (chart P901)"
    assert msg["X-Oprecon-Notices"] is None and msg["X-Oprecon-Window"] == key
    text, html = parts(msg)
    assert "This could not wait for the daily digest." in text
    assert "SUMMARY" not in text and 'data-section="counts"' not in html
    assert f"== {STALE_TITLE} (caregiver_link_stale): 1 ==" in text


def test_a_cleared_cause_is_left_out_of_the_bundle(env: Any, smtp: SmtpSink) -> None:
    e = env()
    quiet_day(e, FD, PM)
    keys = stale_links(e, 4)
    [(rkey, lead)] = send.tick(e.settings, e.sessions, NOW)
    assert lead == keys[0]
    with e.sessions.begin() as s:  # the scan saw two fixed between the tick and the send
        for key in keys[:2]:
            row = s.scalar(select(FindingRow).where(FindingRow.fingerprint == fp_of(key)))
            assert row is not None
            row.state, row.resolved_at = "resolved", NOW
    result = send.deliver(e.settings, e.sessions, rkey, lead, now=NOW)
    assert (result.status, result.items, result.notices) == ("sent", 2, 2)
    [(_, msg)] = smtp.messages
    assert msg["Subject"].startswith("[oprecon] Action needed now: 2 problems (")
    text, _ = parts(msg)
    assert sorted(references(text)) == sorted(fp_of(k) for k in keys[2:])
    # The notice the task named is recorded as skipped; the other cleared one is no
    # longer a notice at all, so nothing claims it.
    assert {r.window_key: r.status for r in e.rows() if r.window_key in keys} == {
        keys[0]: "skipped", keys[2]: "sent", keys[3]: "sent"}

    # Every notice of a bundle cleared: nothing goes out, each row says why.
    smtp.messages.clear()
    more = stale_links(e, 2, first=10)
    with e.sessions.begin() as s:
        for row in s.scalars(select(FindingRow).where(FindingRow.patient_id.in_(
                ["P910", "P911"]))):
            row.state, row.resolved_at = "resolved", NOW
    result = send.deliver(e.settings, e.sessions, rkey, more[0], now=NOW)
    assert result.status == "skipped" and smtp.messages == []
    assert [r.status for r in e.rows() if r.window_key in more] == ["skipped"]  # the lead


def test_beyond_the_cap_the_rest_is_counted_by_check(env: Any, smtp: SmtpSink) -> None:
    e = env(immediate_bundle_max_items=4)
    quiet_day(e, FD, PM)
    keys = stale_links(e, 7)
    for i in range(2):
        changed = NOW - timedelta(minutes=9 - i)
        fp = e.add("welcome_not_sent", "escalated", NOW - timedelta(days=3), contact=f"C4{i}",
                   changed=changed)
        keys.append(f"immediate:{fp}:{b.stamp(changed)}")
    [result] = e.send_due()
    assert (result.status, result.items, result.notices) == ("sent", 9, 9)
    [(_, msg)] = smtp.messages
    assert msg["Subject"].startswith("[oprecon] Action needed now: 9 problems (")
    text, html = parts(msg)
    assert "the first 4 are listed with their steps, the other 5 are only counted" in text
    # Both checks keep a listed example with its steps; the rest are counts.
    assert len(references(text)) == 4
    assert text.count("[ESCALATED]") >= 1 and text.count("[NEW]") >= 1
    assert "... and 5 more of this kind" in text or (
        "... and 4 more of this kind" in text and "... and 1 more of this kind" in text)
    assert f"     7  {STALE_TITLE} (caregiver_link_stale)" in text
    assert 'data-count="welcome_not_sent">2<' in html
    assert [r.status for r in e.rows() if r.window_key in keys] == ["sent"] * 9

    # A cap below the number of checks: a check with nothing listed still shows its steps.
    smtp.messages.clear()
    e1 = env(immediate_bundle_max_items=1)
    quiet_day(e1, FD, PM)
    stale_links(e1, 2)
    e1.add("welcome_not_sent", "escalated", NOW - timedelta(days=3), contact="C77",
           changed=NOW - timedelta(minutes=2))
    e1.send_due()
    [(_, msg)] = smtp.messages
    text, _ = parts(msg)
    assert len(references(text)) == 1
    tail = text.split("(welcome_not_sent): 1 ==")[1]
    assert "... and 1 more of this kind, not listed to keep this message short." in tail
    assert "What to do for each:" in tail and REMEDIES["welcome_not_sent"][0] in tail


def test_a_retried_bundle_is_sent_once(env: Any, smtp: SmtpSink) -> None:
    e = env()
    quiet_day(e, FD, PM)
    keys = stale_links(e, 3)
    [(rkey, lead)] = send.tick(e.settings, e.sessions, NOW)
    smtp.fail_next = ["451 4.3.0 try again later"] * 3  # every in-process attempt
    with pytest.raises(send.TransientDeliveryError):
        send.deliver(e.settings, e.sessions, rkey, lead, now=NOW, final=False,
                     sleep=lambda _: None)
    assert [r.status for r in e.rows() if r.window_key in keys] == ["retrying"] * 3
    assert send.due(e.settings, e.sessions, NOW) == []  # the Celery retry owns them

    # Before the retry runs, the next scan finds one more; the next tick sends it and
    # takes the waiting three along.
    later = NOW + timedelta(minutes=5)
    keys += stale_links(e, 1, first=20, seen=later - timedelta(minutes=1))
    [(_, new_lead)] = send.tick(e.settings, e.sessions, later)
    assert new_lead == keys[-1]
    result = send.deliver(e.settings, e.sessions, rkey, new_lead, now=later)
    assert (result.status, result.notices) == ("sent", 4)
    # The Celery retry of the first attempt, and a redelivered task: nothing more.
    assert send.deliver(e.settings, e.sessions, rkey, lead, now=later).status == "duplicate"
    assert send.deliver(e.settings, e.sessions, rkey, new_lead, now=later).status == (
        "duplicate")
    [(_, msg)] = smtp.messages
    assert sorted(references(parts(msg)[0])) == sorted(fp_of(k) for k in keys)
    assert [r.status for r in e.rows() if r.window_key in keys] == ["sent"] * 4


def test_the_celery_retry_sends_the_bundle_once(env: Any, smtp: SmtpSink) -> None:
    e = env()
    quiet_day(e, FD, PM)
    keys = stale_links(e, 3)
    [(rkey, lead)] = send.tick(e.settings, e.sessions, NOW)
    smtp.fail_next = ["451 4.3.0 try again later"] * 3
    with pytest.raises(send.TransientDeliveryError):
        send.deliver(e.settings, e.sessions, rkey, lead, now=NOW, final=False,
                     sleep=lambda _: None)
    retry = send.deliver(e.settings, e.sessions, rkey, lead, now=NOW, final=False)
    again = send.deliver(e.settings, e.sessions, rkey, lead, now=NOW)
    assert (retry.status, retry.notices, again.status) == ("sent", 3, "duplicate")
    [(_, msg)] = smtp.messages
    assert len(references(parts(msg)[0])) == 3
    assert [r.status for r in e.rows() if r.window_key in keys] == ["sent"] * 3


def test_a_lost_connection_marks_every_notice_of_the_bundle_unknown(
    env: Any, smtp: SmtpSink
) -> None:
    e = env()
    quiet_day(e, FD, PM)
    keys = stale_links(e, 3)
    smtp.fail_next = ["DROP"]
    [result] = e.send_due()
    assert result.status == "unknown"
    assert [r.status for r in e.rows() if r.window_key in keys] == ["unknown"] * 3
    assert send.due(e.settings, e.sessions, NOW) == []  # never resent


def _race_pairs(e: Env, pairs: list[tuple[str, str]]) -> list[str]:
    barrier = threading.Barrier(len(pairs))
    out: list[str] = []

    def run(rkey: str, window: str) -> None:
        barrier.wait()
        out.append(send.deliver(e.settings, e.sessions, rkey, window, now=NOW).status)

    threads = [threading.Thread(target=run, args=p) for p in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return sorted(out)


def _check_racing_bundles(e: Env, smtp: SmtpSink) -> None:
    quiet_day(e, FD, PM)
    keys = stale_links(e, 6)
    rkey = b.recipient_key(PM)
    # The same task twice, and a second tick's task naming another notice of the bundle:
    # whoever claims first takes all six; the others find them taken.
    statuses = _race_pairs(e, [(rkey, keys[0]), (rkey, keys[0]), (rkey, keys[3])])
    assert statuses == ["duplicate", "duplicate", "sent"]
    [(rcpts, msg)] = smtp.messages
    assert rcpts == [PM]
    assert sorted(references(parts(msg)[0])) == sorted(fp_of(k) for k in keys)
    assert [r.status for r in e.rows() if r.window_key in keys] == ["sent"] * 6


def test_racing_workers_send_one_bundle(env: Any, smtp: SmtpSink) -> None:
    _check_racing_bundles(env(), smtp)


@pytest.mark.services
def test_racing_workers_send_one_bundle_on_postgresql(
    env: Any, smtp: SmtpSink, pg_database: str
) -> None:
    migrate(pg_database)
    _check_racing_bundles(env(state_db_url=pg_database, practice="bundle-race-pg"), smtp)


def test_notices_that_came_due_between_ticks_share_one_message(
    env: Any, smtp: SmtpSink
) -> None:
    """The beat's tick is the send point: what appeared since the last one goes together,
    what appears after the send waits for the next tick."""
    e = env()
    quiet_day(e, FD, PM)
    tick = datetime(2026, 11, 25, 12, 45, tzinfo=UTC)
    first = stale_links(e, 2, seen=tick - timedelta(minutes=4))
    second = stale_links(e, 1, first=5, seen=tick - timedelta(seconds=30))
    with freeze_time(tick):
        [pair] = send.tick(e.settings, e.sessions)
        assert pair[1] == first[0]
        assert send.deliver(e.settings, e.sessions, *pair).notices == 3
    late = stale_links(e, 1, first=9, seen=tick + timedelta(minutes=1))
    with freeze_time(tick + timedelta(minutes=5)):
        [pair] = send.tick(e.settings, e.sessions)
        assert pair[1] == late[0]
        result = send.deliver(e.settings, e.sessions, *pair)
    assert (result.status, result.notices) == ("sent", 1)
    texts = [parts(m)[0] for _, m in smtp.messages]
    assert [len(references(t)) for t in texts] == [3, 1]
    assert set(references(texts[0])) == {fp_of(k) for k in first + second}


def test_webhook_gets_one_post_per_bundle(env: Any, webhook: HookSink, smtp: SmtpSink) -> None:
    e = env(digest_recipients={}, webhook_url=f"http://127.0.0.1:{webhook.port}/hook")
    e.mark_sent("webhook", "daily:2026-11-25", created=CLOSE)
    stale_links(e, 3)
    [result] = e.send_due()
    assert (result.status, result.notices) == ("sent", 3)
    [body] = webhook.bodies
    assert body["text"].startswith(f"[oprecon] Action needed now: 3 problems ({STALE_TITLE})")
    assert f"{STALE_TITLE}: 3" in body["text"]


def test_a_mass_event_is_one_capped_message(env: Any, smtp: SmtpSink) -> None:
    """More notices than one lookup query takes: still one message, 50 listed, all sent."""
    e = env()
    quiet_day(e, FD, PM)
    n = send.KEYS_PER_QUERY + 20
    keys = stale_links(e, n)
    [result] = e.send_due()
    assert (result.status, result.items, result.notices) == ("sent", n, n)
    [(_, msg)] = smtp.messages
    assert msg["Subject"] == f"[oprecon] Action needed now: {n} problems ({STALE_TITLE})"
    text, _ = parts(msg)
    assert len(references(text)) == e.settings.immediate_bundle_max_items == 50
    assert f"... and {n - 50} more of this kind" in text
    assert [r.status for r in e.rows() if r.window_key in keys] == ["sent"] * n
    assert send.due(e.settings, e.sessions, NOW + timedelta(minutes=5)) == []


def test_a_bundle_says_shared_steps_once_then_lists_every_family(
    env: Any, smtp: SmtpSink, webhook: HookSink
) -> None:
    """Issue 16: a bundle of 35 stale links repeated the same four steps 35 times (88 KB).
    Items that share their steps get them once, then one line per family."""
    hook = f"http://127.0.0.1:{webhook.port}/hook"
    e = env(web_base_url="https://console.example", webhook_url=hook)
    quiet_day(e, FD, PM, "webhook")
    keys = stale_links(e, 35)
    with e.sessions.begin() as s:  # every refresh on hold for the same 15 minutes
        for row in s.scalars(select(FindingRow)):
            row.next_check_at = NOW + timedelta(minutes=15)
    assert sorted(r.status for r in e.send_due()) == ["sent", "sent"]
    [msg] = smtp.to(PM)
    size = len(msg.as_bytes())
    assert size < 20_000, size  # was ~95 KB: every item carried the four steps
    text, html = parts(msg)
    [body] = webhook.bodies
    blocks = "\n".join(b["text"]["text"] for b in body["blocks"] if b["type"] == "section")
    steps = REMEDIES["caregiver_link_stale"]
    for step in steps:
        assert text.count(step) == 1, step
        assert html.count(str(escape(step))) == 1, step
        assert body["text"].count(step) == 1 and blocks.count(_slack(step)) == 1, step
    assert text.count("oprecon checks again: ") == 1
    assert "oprecon checks again: confirms after 07:55 EST" in text  # one hold for all
    for i in range(1, 36):
        who = f"chart P{900 + i}, contact C{900 + i}, portal user U{900 + i}"
        assert text.count(who) == 1 and html.count(who) == 1 and body["text"].count(who) == 1
        assert f"https://console.example/families/P{900 + i}" in text
        assert f'href="https://console.example/families/P{900 + i}"' in html
    assert sorted(references(text)) == sorted(fp_of(k) for k in keys)
    assert all(fp_of(k) in html and fp_of(k) in blocks for k in keys)


def test_a_capped_bundle_says_how_many_are_left_out_and_where_to_see_them(
    env: Any, smtp: SmtpSink, webhook: HookSink
) -> None:
    hook = f"http://127.0.0.1:{webhook.port}/hook"
    e = env(immediate_bundle_max_items=3, web_base_url="https://console.example",
            webhook_url=hook)
    quiet_day(e, FD, PM, "webhook")
    stale_links(e, 5)
    e.send_due()
    [msg] = smtp.to(PM)
    text, html = parts(msg)
    [body] = webhook.bodies
    link = "https://console.example/findings?check=caregiver_link_stale"
    assert "the first 3 are listed with their steps, the other 2 are only counted" in text
    assert ("... and 2 more of this kind, not listed to keep this message short; handle "
            "each like the ones above. `oprecon findings --check caregiver_link_stale` "
            f"lists every one, and so does the console: {link}.") in text.replace("\r\n", "\n")
    assert 'data-hidden="2"' in html and f'href="{link}"' in html
    assert ("… and 2 more: `oprecon findings --check caregiver_link_stale` lists every one, "
            f"and so does the console: {link}") in body["text"]
    assert len(references(text)) == 3


def _slack(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# -- what happens next, in words that say what oprecon will actually do --------------------


def test_next_check_says_staff_approval_root_cause_or_hold(env: Any, smtp: SmtpSink) -> None:
    """Issue 16: "checks again on the next scan" was printed for fixes the mass-change
    guard holds, for portal fixes waiting on an OP-side root cause and for holds."""
    e = env(digest_recipients={"front_desk": [FD], "practice_manager": [PM]})
    after_yesterday(e)
    h = timedelta(hours=1)
    # A fix staged by the mass-change guard in run 7: the finding stays open.
    staged = e.add("welcome_not_sent", "open", NOW - 5 * h, patient="P1", contact="C1")
    with e.sessions.begin() as s:
        row = s.scalar(select(FindingRow).where(FindingRow.fingerprint == staged))
        assert row is not None
        s.add(ActionRow(practice=e.settings.practice, finding_id=row.id, run_id=7,
                        kind="resend_welcome", idempotency_key=f"{staged}:x:1", params={},
                        status="staged", created_at=NOW - 5 * h))
    # A portal fix that waits for its family's chart email to be cleared in OP.
    e.add("caregiver_link_missing", "open", NOW - 4 * h, patient="P2", contact="C2", user="U2")
    e.add("patient_email_present", "open", NOW - 4 * h, patient="P2")
    # A plain OP-side problem: the next scan is what happens next.
    e.add("authority_invalid", "open", NOW - 3 * h, patient="P3", contact="C3")
    e.send_due()
    text = parts(smtp.to(FD)[0])[0].replace("\r\n", "\n")

    def next_check(check: str) -> str:
        section = text.split(f"({check}): 1 ==")[1].split("\n== ")[0]
        return section.split("oprecon checks again: ")[1].split("\n")[0]

    assert next_check("welcome_not_sent") == (
        "waiting for staff approval: oprecon fixes approve 7 (look first with oprecon fixes "
        "show 7); the mass-change guard holds this fix until then")
    assert next_check("caregiver_link_missing") == (
        "waits until patient_email_present on this family (chart P2) is fixed in OP; then "
        "oprecon refreshes the parent's portal connection by itself")
    assert next_check("authority_invalid").startswith("on the next scan (every 5 minutes)")

    # A stale link whose refresh is on hold: confirmed once the portal has caught up.
    smtp.messages.clear()
    seen = NOW - timedelta(minutes=25)
    fp = e.add("caregiver_link_stale", "held", seen, severity="high", patient="P9",
               contact="C9", user="U9", changed=NOW - timedelta(minutes=5))
    with e.sessions.begin() as s:
        row = s.scalar(select(FindingRow).where(FindingRow.fingerprint == fp))
        assert row is not None
        row.next_check_at = NOW + timedelta(minutes=15)
    e.send_due()
    [msg] = smtp.to(PM)
    text, html = parts(msg)
    said = ("oprecon checks again: confirms after 07:55 EST, once the portal has had time "
            "to show the fix")
    assert said in text and said in html
    assert "on the next scan" not in text

    # `oprecon findings` (and the console, through the same function) says the same in
    # a table column: who or what the fix is waiting for.
    import io

    from worker.cli.state import list_findings

    out = io.StringIO()
    list_findings(e.settings, None, None, False, 50, now=NOW, out=out)
    lines = {ln.split()[1]: ln for ln in out.getvalue().splitlines()[2:] if ln.strip()
             and len(ln.split()) > 1}
    assert "staff approval: oprecon fixes approve 7" in lines["welcome_not_sent"]
    assert "after patient_email_present P2 is fixed in OP" in lines["caregiver_link_missing"]
    assert "next scan" in lines["authority_invalid"]


def test_a_daily_digest_says_the_steps_of_many_new_items_once(env: Any, smtp: SmtpSink) -> None:
    """Forty parents whose authority needs a look, found the same day: the daily digest
    lists each family once with its reference, and the steps once for all of them."""
    e = env()
    after_yesterday(e)
    for i in range(40):
        e.add("authority_invalid", "open", PREV_CLOSE + timedelta(hours=2, minutes=i),
              patient=f"P{500 + i}", contact=f"C{500 + i}")
    e.send_due()
    [fd] = smtp.to(FD)
    text, html = parts(fd)
    assert len(fd.as_bytes()) < 25_000, len(fd.as_bytes())
    for step in REMEDIES["authority_invalid"]:
        assert text.count(step) == 1 and html.count(str(escape(step))) == 1, step
    for i in range(40):
        assert text.count(f"chart P{500 + i}, contact C{500 + i}") == 1
    assert "New since the last digest:       40" in text
