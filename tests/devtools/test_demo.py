"""`oprecon demo`, the README's first command, end to end in-process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from worker.cli.main import app


def test_demo_finds_every_planted_problem_and_fixes_the_safe_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    out = result.output
    m = re.search(r"recall (\d+)/(\d+), unexpected findings (\d+); (\d+) finding", out)
    assert m, out
    found, planted, unexpected, fixed = map(int, m.groups())
    assert found == planted > 10 and unexpected == 0 and fixed >= 4
    assert "mismatches confirmed, safe fixes sent" in out
    assert (tmp_path / "var" / "demo.sqlite").exists()
