"""Failed scans are visible where on-call looks: a run row with its cause, `status --json`
errors, and `oprecon health` naming the part that failed and why (issue 16 #2).

Real sources (the bundled demo practice's CSV exports, copied; the portal's HTTP API on
a port nobody listens on), real Redis, SQLite and PostgreSQL state databases; the CLI runs
in-process through `worker.cli.main.main`, so output and exit codes are the real ones.
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

from tests.procs import free_port
from worker.runtime import service
from worker.scan.wiring import state_sessions
from worker.sources.base import SourceError
from worker.state.db import kv_set, migrate
from worker.state.models import Run

DEMO = Path(__file__).resolve().parents[2] / "worker" / "devtools" / "demo_practice"


def practice_copy(tmp_path: Path) -> Path:
    target = tmp_path / "practice"
    shutil.copytree(DEMO / "op", target / "op")
    shutil.copytree(DEMO / "portal", target / "portal")
    return target


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            *args: str) -> tuple[int, str, str]:
    from worker.cli.main import main

    monkeypatch.setattr(sys, "argv", ["oprecon", *args])
    with pytest.raises(SystemExit) as done:
        main()
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


def use_env(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    for name in ("state_db_url", "redis_url", "broker_url", "practice", "heartbeat_dir",
                 "op_dir", "portal_dir", "portal_source", "portal_url", "portal_max_retries"):
        value = getattr(settings, name)
        if value is not None:
            monkeypatch.setenv(f"OPRECON_{name.upper()}", str(value))
    monkeypatch.setenv("OPRECON_LOG_FORMAT", "json")


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url
        return
    url: str = request.getfixturevalue("pg_database")
    migrate(url)
    yield url
    # The runtime caches an engine per URL; close its pooled connections now, not when
    # the cache drops it (a psycopg connection collected while open is a warning).
    from worker.scan.wiring import _sessions_for

    _sessions_for(url).kw["bind"].dispose()


def test_scan_failing_before_its_run_row_records_one_and_on_call_sees_the_cause(
    tmp_path: Path, make_settings: Any, state_url: str, redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The OP folder renamed away under a running deployment: an incremental scan (which
    reads what changed before opening its run) fails on its first read."""
    practice = practice_copy(tmp_path)
    settings = make_settings(state_db_url=state_url, practice=f"fail-{uuid.uuid4().hex[:8]}",
                             op_dir=practice / "op", portal_dir=practice / "portal")
    sessions = state_sessions(settings)
    with sessions.begin() as s:  # an earlier scan set the watermark
        kv_set(s, settings.practice, "watermark", {"at": "2026-11-30T01:00:00+00:00",
                                                   "patients": 40}, _now())
    (practice / "op").rename(practice / "op-renamed")

    with pytest.raises(SourceError):
        service.scan(settings, "incremental", task_id="t-fail-1")

    with sessions() as s:
        runs = list(s.scalars(select(Run).where(Run.practice == settings.practice)))
    assert [(r.kind, r.status, r.task_id) for r in runs] == [("incremental", "failed",
                                                              "t-fail-1")]
    cause = runs[0].error or ""
    assert cause.startswith("op source: SourceError: OP export directory")
    assert "does not exist" in cause

    use_env(monkeypatch, settings)
    code, out, _ = run_cli(monkeypatch, capsys, "status", "--json")
    st = json.loads(out)
    assert code == 0
    assert any("incremental" in e and "does not exist" in e for e in st["errors"]), st["errors"]
    assert st["runs"][0]["status"] == "failed" and st["runs"][0]["error"] == cause

    code, out, _ = run_cli(monkeypatch, capsys, "status")
    assert f"run {runs[0].id} (incremental) failed" in out and "does not exist" in out

    code, out, _ = run_cli(monkeypatch, capsys, "health")
    assert code == 1
    op_line = next(line for line in out.splitlines() if "op source" in line)
    assert op_line.lstrip().startswith("FAIL") and "does not exist" in op_line
    portal_line = next(line for line in out.splitlines() if line.lstrip()[6:].startswith("portal"))
    assert portal_line.lstrip().startswith("ok")
    scan_line = next(line for line in out.splitlines() if "last scan" in line)
    assert scan_line.lstrip().startswith("FAIL") and "op source: SourceError" in scan_line
    assert out.splitlines()[-1].startswith("unhealthy:") and "op source" in out.splitlines()[-1]


def test_portal_down_fails_the_engine_run_with_the_portal_named(
    tmp_path: Path, make_settings: Any, state_url: str, redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The portal stopped: the full scan's run row (opened before reading) ends failed with
    the portal as the part, once (no second row from the runtime), and health says so."""
    practice = practice_copy(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    settings = make_settings(state_db_url=state_url, practice=f"down-{uuid.uuid4().hex[:8]}",
                             op_dir=practice / "op", portal_source="http", portal_url=dead,
                             portal_max_retries=0)
    with pytest.raises(SourceError):
        service.scan(settings, "full", task_id="t-portal")
    with state_sessions(settings)() as s:
        runs = list(s.scalars(select(Run).where(Run.practice == settings.practice)))
    assert len(runs) == 1 and runs[0].status == "failed"
    assert (runs[0].error or "").startswith("portal: PortalUnavailable: portal GET /users")
    assert (runs[0].summary or {}).get("part") == "portal"

    use_env(monkeypatch, settings)
    code, out, _ = run_cli(monkeypatch, capsys, "health")
    portal_line = next(line for line in out.splitlines() if line.lstrip()[6:].startswith("portal"))
    assert portal_line.lstrip().startswith("FAIL")
    assert "no answer" in portal_line and "last error: run" in portal_line
    assert "PortalUnavailable" in portal_line


def _now() -> Any:
    from worker.scan.engine import utcnow

    return utcnow()
