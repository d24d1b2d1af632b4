"""Log lines are JSON with ids only: names, emails, phones and birth dates never leak,
whoever logs them, and a whole demo run leaks none of the demo practice's."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import pytest
import structlog

from worker.devtools.demo import PRACTICE, run_demo
from worker.runtime.logging import setup_logging


@pytest.fixture
def log_stream() -> io.StringIO:
    stream = io.StringIO()
    setup_logging("DEBUG", "json", stream=stream)
    yield stream
    setup_logging("WARNING", "json")


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(x) for x in stream.getvalue().splitlines() if x.strip()]


def test_phi_keys_and_patterns_are_redacted(log_stream: io.StringIO) -> None:
    log = structlog.get_logger("t")
    structlog.contextvars.bind_contextvars(task_id="abc-123", task_name="oprecon.scan.full")
    log.info("contact_seen", contact_id="C000042", email="jane.doe@example.org",
             first_name="Jane", note="call 617-555-0199 or jane.doe@example.org, born 1984-03-07")
    logging.getLogger("stdlib").warning("user %s failed", "bob@example.com")
    structlog.contextvars.clear_contextvars()
    first, second = lines(log_stream)
    assert first["contact_id"] == "C000042" and first["task_id"] == "abc-123"
    assert first["task_name"] == "oprecon.scan.full" and first["level"] == "info"
    text = log_stream.getvalue()
    for secret in ("jane.doe@example.org", "Jane", "617-555-0199", "1984-03-07", "bob@"):
        assert secret not in text
    assert second["event"] == "user [redacted] failed"


def _phi_of_practice(practice: Path) -> set[str]:
    values: set[str] = set()
    for name, cols in (("op/patients.csv", ("first_name", "last_name", "email", "dob")),
                       ("op/contacts.csv", ("first_name", "last_name", "email", "phone", "dob",
                                            "address")),
                       ("portal/portal_users.csv", ("first_name", "last_name", "email"))):
        with (practice / name).open(newline="", encoding="utf-8", errors="replace") as fh:
            for row in csv.DictReader(fh):
                values |= {row[c] for c in cols if row.get(c) and len(row[c]) > 3
                           and row[c].upper() != "N/A"}
    return values


def test_full_demo_run_logs_no_phi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    stream = io.StringIO()
    from worker.devtools import demo

    monkeypatch.setattr(demo, "setup_logging",
                        lambda level, fmt: setup_logging("DEBUG", "json", stream=stream))
    run_demo()
    logged = stream.getvalue()
    assert len(logged.splitlines()) > 5
    leaked = [v for v in _phi_of_practice(PRACTICE) if v in logged]
    assert leaked == []


def test_logs_follow_stderr_after_the_stream_they_started_on_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CLI sets up logging on stderr; when stderr was a redirect that is closed
    later (a test's capture, a wrapper), a library thread's log line goes to the stderr
    of the moment instead of failing with "I/O operation on closed file"."""
    import sys

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    try:
        setup_logging("INFO", "json")
        first.close()
        now = io.StringIO()
        monkeypatch.setattr(sys, "stderr", now)
        logging.getLogger("some.library").info("peer connected")
        assert json.loads(now.getvalue())["event"] == "peer connected"
    finally:
        setup_logging("WARNING", "json")
