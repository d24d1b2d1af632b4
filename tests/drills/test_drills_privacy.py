"""Drill: no protected health information, and no secret, in anything oprecon writes for
people to read — and digests only to the configured recipients.

A generated practice (plus one row whose email and status columns an export swapped) is
scanned, its fixes applied, and two runs fail, all with DEBUG logs captured; then
`oprecon status` (text and `--json`), `oprecon findings --json --state all`, the
Prometheus metrics text, the runs' stored errors and the digest that goes out are
searched for every name, email, phone, birth date and address of the practice's
exports, and for every password and token in the configuration. The infrastructure
carries real secrets: Redis runs with `requirepass`, the portal simulator requires its
bearer token, the state database URL has a password (PostgreSQL's trust auth ignores it).

tests/runtime/test_logging.py already runs the demo under DEBUG logs; worker logs of a live
worker are searched in tests/runtime/test_scheduling.py and tests/drills/test_drills_worker.py.
"""

from __future__ import annotations

import asyncio
import csv
import email
import email.policy
import io
import json
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select
from sqlalchemy.engine import make_url

from tests.procs import RedisServer, free_port, stop_smtp
from worker.devtools.generator import generate_practice
from worker.devtools.simulator import start_simulator
from worker.runtime import metrics, service
from worker.runtime.logging import setup_logging
from worker.scan.wiring import state_sessions
from worker.sources.base import SourceError
from worker.sources.portal_http import PortalProtocolError
from worker.state.models import Run

PHI_COLUMNS = {
    "op/patients.csv": ("first_name", "last_name", "email", "dob"),
    "op/contacts.csv": ("first_name", "last_name", "email", "dob", "phone", "address"),
    "portal/portal_users.csv": ("first_name", "last_name", "email"),
}
# The export swapped this patient's email and status columns: the status check quotes the
# bad value, which is an email.
SWAPPED = "PSWAP1,Odalys,Quennell,2016-02-03,Active,odalys.q@family.example,2026-01-01T00:00:00Z"
SECRETS = {"redis": "redis-Sekrit-77", "db": "db-Sekrit-88", "portal": "portal-Sekrit-99",
           "smtp": "smtp-Sekrit-66"}
STAFF = "frontdesk@practice.example"


def phi_of_practice(practice: Path) -> set[str]:
    """Every name, email, phone, birth date and address in a practice's exports (values
    longer than three characters, so that "Li" does not match every "List")."""
    values: set[str] = set()
    for name, cols in PHI_COLUMNS.items():
        with (practice / name).open(newline="", encoding="utf-8", errors="replace") as fh:
            for row in csv.DictReader(fh):
                values |= {row[c] for c in cols if row.get(c) and len(row[c]) > 3
                           and row[c].upper() != "N/A"}
    return values


class SmtpSink:
    """Keeps every envelope recipient and message the SMTP server is handed."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[tuple[list[str], EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.received.append((list(envelope.rcpt_tos), msg))
        await asyncio.sleep(0)
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    controller = Controller(sink, hostname="127.0.0.1", port=sink.port)
    controller.start()
    try:
        yield sink
    finally:
        stop_smtp(controller)


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    setup_logging("DEBUG", "json", stream=stream)
    yield stream
    setup_logging("WARNING", "json")


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
         *args: str) -> tuple[int, str, str]:
    from worker.cli.main import main

    monkeypatch.setattr(sys, "argv", ["oprecon", *args])
    with pytest.raises(SystemExit) as done:
        main()
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


@pytest.mark.services
def test_nothing_people_read_carries_phi_or_secrets_and_digests_reach_only_staff(
    tmp_path: Path, pg_database: str, make_settings: Any, smtp: SmtpSink,
    logs: io.StringIO, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    practice = tmp_path / "practice"
    generate_practice(practice, patients=250, seed=4, now=datetime.now(UTC))
    phi = phi_of_practice(practice) | {"Odalys", "Quennell", "odalys.q@family.example",
                                       "2016-02-03"}
    with (practice / "op/patients.csv").open("a", encoding="utf-8") as fh:
        fh.write(SWAPPED + "\n")
    redis_server = RedisServer(tmp_path / "redis", password=SECRETS["redis"]).start()
    sim, url = start_simulator(portal_dir=practice / "portal", op_dir=practice / "op",
                               token=SECRETS["portal"])
    db_url = make_url(pg_database).set(password=SECRETS["db"]).render_as_string(False)
    try:
        values: dict[str, Any] = {
            "state_db_url": db_url, "redis_url": redis_server.url(1),
            "broker_url": redis_server.url(0), "practice": f"drill-phi-{uuid.uuid4().hex[:6]}",
            "op_dir": practice / "op", "portal_source": "http", "portal_url": url,
            "portal_token": SECRETS["portal"], "propagation_delay_minutes": 0,
            "allow_unsafe_propagation_delay": True,
            "smtp_host": "127.0.0.1", "smtp_port": smtp.port, "smtp_password": SECRETS["smtp"],
            "smtp_sender": "oprecon@practice.example",
            "digest_recipients": {"default": [STAFF]}, "log_level": "DEBUG",
        }
        settings = make_settings(**values)
        for key, value in values.items():
            monkeypatch.setenv(f"OPRECON_{key.upper()}",
                               json.dumps(value) if isinstance(value, dict) else str(value))

        # A scan that finds everything, and its fixes applied through the portal.
        outcome = service.scan(settings, "full")
        assert outcome.result is not None and outcome.action_ids
        swapped = [i.finding for i in outcome.result.plan.items
                   if i.finding.patient_id == "PSWAP1"]
        assert [f.check for f in swapped] == ["invalid_record"]
        assert "bad status '[redacted]'" in swapped[0].detail
        for action_id in outcome.action_ids:
            assert service.apply_fix(settings, action_id) == "applied"
        # Two runs that fail: a broken portal answer, a missing export file.
        httpx.post(f"{url}/_sim/faults", json={"malformed": 1, "path": "/users"}, timeout=5,
                   headers={"Authorization": f"Bearer {SECRETS['portal']}"}).raise_for_status()
        with pytest.raises(PortalProtocolError):
            service.scan(settings, "full")
        with pytest.raises(SourceError):
            service.scan(settings.model_copy(update={"op_dir": tmp_path / "gone"}), "full")

        # The CLI sets up logging to stderr again (DEBUG, JSON): its stderr is logs too.
        code, status_text, err1 = _cli(monkeypatch, capsys, "status")
        assert code == 0
        code, status_json, err2 = _cli(monkeypatch, capsys, "status", "--json")
        assert code == 0 and json.loads(status_json)["runs"]
        code, findings_json, err3 = _cli(monkeypatch, capsys, "findings", "--json", "--state",
                                         "all")
        assert code == 0 and len(findings_json.splitlines()) == len(outcome.result.plan.items)
        code, digest_out, err4 = _cli(monkeypatch, capsys, "digest")
        assert code == 0 and "sent" in digest_out, digest_out

        with state_sessions(settings)() as s:
            errors = [r.error for r in s.scalars(select(Run).where(
                Run.practice == settings.practice)) if r.error]
        assert len(errors) == 2
        assert smtp.received, "no digest went out"
        digests = [m.as_string() for _, m in smtp.received]
        for rcpts, msg in smtp.received:
            assert rcpts == [STAFF] and msg["To"] == STAFF
            assert msg["Cc"] is None and msg["Bcc"] is None
        readable = {
            "logs": logs.getvalue(), "cli logs": err1 + err2 + err3 + err4, "status": status_text,
            "status --json": status_json, "findings --json": findings_json,
            "metrics": metrics.render().decode(), "runs.error": "\n".join(errors),
            "digest": "\n".join(digests), "digest cli": digest_out,
        }
        # The checks below mean something only if the runs and fixes were logged here (how
        # many lines a DEBUG run writes varies with the load; which events do not).
        said = {json.loads(line).get("event") for line in readable["logs"].splitlines()
                if line.startswith("{")}
        assert {"run_finished", "fix_applied"} <= said, sorted(e for e in said if e)
        leaks = {where: sorted(v for v in phi if v in text)[:5]
                 for where, text in readable.items()}
        assert leaks == dict.fromkeys(readable, [])
        secrets = {where: [k for k, v in SECRETS.items() if v in text]
                   for where, text in readable.items()}
        assert secrets == dict.fromkeys(readable, [])
        assert "postgres:***@" in status_text  # the URLs are shown, masked
    finally:
        sim.shutdown()
        redis_server.stop()
        from worker.scan.wiring import _sessions_for

        _sessions_for(db_url).kw["bind"].dispose()  # before the session's database is dropped
