"""Settings: one line naming the bad setting, and no fixes without the guard unless
someone says so explicitly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import Policy, SettingsError, load_settings


def test_defaults_are_the_documented_time_rules() -> None:
    s = load_settings()
    assert s.propagation_delay.total_seconds() == 15 * 60
    assert s.hold.total_seconds() == 15 * 60
    assert s.source_refresh_hold.total_seconds() == 20 * 60


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"OPRECON_HOLD_MINUTES": "soon"}, "OPRECON_HOLD_MINUTES"),
        ({"OPRECON_POLICIES": '{"no_such_check": "fix"}'}, "OPRECON_POLICIES"),
        ({"OPRECON_POLICIES__WELCOME_NOT_SENT": "maybe"}, "OPRECON_POLICIES__WELCOME_NOT_SENT"),
        ({"OPRECON_DIGEST_TIME": "7:30pm"}, "OPRECON_DIGEST_TIME"),
        ({"OPRECON_LOG_LEVEL": "CHATTY"}, "OPRECON_LOG_LEVEL"),
    ],
)
def test_invalid_setting_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch,
                                               env: dict[str, str], name: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError) as err:
        load_settings()
    message = str(err.value)
    assert "\n" not in message and name in message


def test_fix_mode_without_the_mass_change_guard_needs_an_explicit_flag() -> None:
    unguarded = dict(mass_change_max_fixes=0, mass_change_max_percent=0,
                     policies={"welcome_not_sent": "fix"})
    with pytest.raises(SettingsError, match="allow_unguarded_fixes"):
        load_settings(**unguarded)
    s = load_settings(**unguarded, allow_unguarded_fixes=True)
    assert s.policies["welcome_not_sent"] is Policy.FIX


def test_toml_file_and_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "oprecon.toml"
    cfg.write_text(
        'hold_minutes = 30\npractice = "north"\n[policies]\nwelcome_not_sent = "alert"\n'
    )
    monkeypatch.setenv("OPRECON_CONFIG_FILE", str(cfg))
    monkeypatch.setenv("OPRECON_PRACTICE", "south")
    s = load_settings()
    assert s.hold_minutes == 30 and s.practice == "south"
    assert s.policies == {"welcome_not_sent": Policy.ALERT}


def test_cli_stops_with_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {"OPRECON_HOLD_MINUTES": "-5", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "worker.cli.main", "migrate"], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "OPRECON_HOLD_MINUTES" in out.stderr


def test_a_missing_settings_file_is_an_error_not_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPRECON_CONFIG_FILE", str(tmp_path / "typo.toml"))
    with pytest.raises(SettingsError, match="OPRECON_CONFIG_FILE: no file at"):
        load_settings()

