"""The small things on-call trips over (issue 16 #9), each as the operator meets it:
the CLI in-process through `worker.cli.main.main`, a real SQLite state database, the
clock frozen where a rule depends on it."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from freezegun import freeze_time

from tests.cli.test_statecli import T0, run_cli, use_env
from worker.runtime import health
from worker.scan.wiring import state_sessions
from worker.state.db import kv_get


def test_silence_with_an_unreadable_until_names_until(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_env(monkeypatch, make_settings())
    code, _, err = run_cli(monkeypatch, capsys, "silence", "fp-open", "--until",
                           "next tuesday", "--reason", "family asked")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("oprecon: --until: not an ISO 8601 date or time") and "--now" not in err


def test_an_unknown_option_is_a_usage_error_not_could_not_run(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_env(monkeypatch, make_settings())
    code, _, err = run_cli(monkeypatch, capsys, "findings", "--bogus")
    assert code == 2
    assert "No such option: --bogus" in err and "could not run" not in err
    assert "Usage:" in err


def test_resume_when_not_paused_says_so_and_a_second_pause_keeps_since(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    use_env(monkeypatch, settings)
    code, out, _ = run_cli(monkeypatch, capsys, "resume")
    assert code == 0 and out.strip() == "fixes were not paused: nothing to resume"
    with freeze_time(T0):
        run_cli(monkeypatch, capsys, "pause", "--reason", "portal maintenance")
    with freeze_time(T0 + timedelta(hours=2)):
        code, out, _ = run_cli(monkeypatch, capsys, "pause", "--reason", "still down")
    assert code == 0 and out.startswith("fixes were already paused (since")
    with state_sessions(settings)() as s:
        value = kv_get(s, "test", "paused")
    assert value == {"paused": True, "reason": "still down", "at": T0.isoformat()}


def test_health_is_not_green_while_fixes_are_paused(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    use_env(monkeypatch, settings)
    run_cli(monkeypatch, capsys, "pause", "--reason", "portal maintenance")
    checks = {c.name: c for c in health.cluster_checks(settings)}
    assert not checks["fixes"].ok
    assert "PAUSED since" in checks["fixes"].detail and "portal maintenance" in checks[
        "fixes"].detail
    run_cli(monkeypatch, capsys, "resume")
    checks = {c.name: c for c in health.cluster_checks(settings)}
    assert checks["fixes"].ok


def test_findings_json_says_when_a_pending_finding_is_confirmed_as_the_table_does(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.cli.test_statecli import finding

    settings = make_settings()
    with state_sessions(settings).begin() as s:
        s.add(finding("fp-pending", "caregiver_link_missing", "pending", patient_id="P9"))
    use_env(monkeypatch, settings)
    with freeze_time(T0 + timedelta(minutes=1)):
        code, out, _ = run_cli(monkeypatch, capsys, "findings")
        assert "confirm in 14m00s" in out
        code, out, _ = run_cli(monkeypatch, capsys, "findings", "--json")
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["next_check_at"] == (T0 + timedelta(minutes=15)).isoformat()

