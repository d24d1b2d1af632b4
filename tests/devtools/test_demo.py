"""`oprecon demo`, the README's first command, end to end in-process."""

from __future__ import annotations

import csv
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import BROKER_URL, REDIS_URL
from worker.cli.main import app
from worker.devtools.demo import PRACTICE, shift_practice

TIMES = {"updated_at", "created_at", "last_sync_at", "at"}


def test_demo_finds_every_planted_problem_and_fixes_the_safe_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    started = datetime.now(UTC)
    result = CliRunner().invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    out = result.output
    m = re.search(r"recall (\d+)/(\d+), unexpected findings (\d+); (\d+) finding", out)
    assert m, out
    found, planted, unexpected, fixed = map(int, m.groups())
    assert found == planted > 10 and unexpected == 0 and fixed >= 4
    assert "mismatches confirmed, safe fixes sent" in out
    assert (tmp_path / "var" / "demo.sqlite").exists()

    # Issue 16: a newcomer's `oprecon status` on the demo database showed the dead-man's
    # switch OVERDUE and runs 27 days old. The demo's 40 simulated minutes end now.
    monkeypatch.setenv("OPRECON_CONFIG_FILE", str(tmp_path / "var" / "demo.toml"))
    monkeypatch.setenv("OPRECON_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("OPRECON_BROKER_URL", BROKER_URL)
    status = CliRunner().invoke(app, ["status"])
    assert status.exit_code == 0, status.output
    text = status.output
    assert "OVERDUE" not in text
    assert not re.search(r"\b\d+d\d\dh\b", text), text  # no age in days
    assert "last scan  demo run 3 succeeded " in text
    assert "dead-man's switch not armed (only oprecon demo has scanned this database" in text
    starts = [datetime.fromisoformat(s.replace("Z", "+00:00"))
              for s in re.findall(r"demo\s+all\s+succeeded\s+(\S+ \S+)", text)]
    assert len(starts) == 3
    assert started - timedelta(minutes=41) <= min(starts) and max(starts) <= datetime.now(UTC)


def test_the_demo_practice_is_moved_in_time_as_a_whole(tmp_path: Path) -> None:
    """Only timestamps move, all by the same amount; dates of birth and every other value
    (a planted unreadable one included) stay as generated."""
    delta = timedelta(days=27, minutes=13, seconds=5)
    moved = shift_practice(PRACTICE, tmp_path / "moved", delta)
    for path in sorted(PRACTICE.glob("*/*.csv")):
        with path.open(encoding="utf-8") as a, (moved / path.parent.name / path.name).open(
                encoding="utf-8") as b:
            before, after = list(csv.DictReader(a)), list(csv.DictReader(b))
        assert len(before) == len(after) > 0, path.name
        for old, new in zip(before, after, strict=True):
            for column, value in old.items():
                want = _moved(value, delta) if column in TIMES else value
                assert new[column] == want, (path.name, column)


def _moved(value: str, delta: timedelta) -> str:
    try:
        return (datetime.fromisoformat(value) + delta).isoformat()
    except ValueError:
        return value  # blank or unreadable: left for the reader to report
