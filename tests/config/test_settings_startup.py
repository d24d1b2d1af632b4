"""Settings that are wrong stop start-up in one line, before they cost a scan or a digest
(issue 16 #7): a time zone or recipient that cannot work, a worker without its OP folder,
a bad number given to a Celery worker, and the example settings file's SMTP keys."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from config.settings import SettingsError, load_settings
from tests.procs import BIN, ROOT, base_env, free_port

EXAMPLE = ROOT / "config" / "oprecon.example.toml"


@pytest.mark.parametrize(
    ("env", "name", "words"),
    [
        ({"OPRECON_DIGEST_TIMEZONE": "America/NewYork"}, "OPRECON_DIGEST_TIMEZONE",
         "unknown time zone 'America/NewYork'"),
        ({"OPRECON_DIGEST_RECIPIENTS": '{"front_desk": ["frontdesk@practice"]}'},
         "OPRECON_DIGEST_RECIPIENTS", "front_desk address #1 is not an email address"),
        ({"OPRECON_DIGEST_RECIPIENTS": '{"front_desk": ["front desk@practice.example"]}'},
         "OPRECON_DIGEST_RECIPIENTS", "not an email address"),
        ({"OPRECON_DIGEST_RECIPIENTS": '{"frontdesk": ["fd@practice.example"]}'},
         "OPRECON_DIGEST_RECIPIENTS", "unknown category 'frontdesk'"),
    ],
)
def test_zone_and_recipients_that_cannot_work_stop_start_up(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], name: str, words: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError) as err:
        load_settings()
    message = str(err.value)
    assert "\n" not in message and name in message and words in message


def test_example_file_loads_with_its_smtp_keys_at_the_top(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    top = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert {"smtp_host", "smtp_port", "smtp_starttls", "smtp_ssl", "smtp_sender"} <= set(top)
    monkeypatch.setenv("OPRECON_CONFIG_FILE", str(EXAMPLE))
    settings = load_settings()
    assert settings.smtp_sender == top["smtp_sender"]
    assert set(settings.digest_recipients) == {"front_desk", "practice_manager"}


def test_a_setting_appended_below_a_table_is_named_for_what_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the issue's operator did: smtp_host added at the end of the example file."""
    cfg = tmp_path / "oprecon.toml"
    cfg.write_text(EXAMPLE.read_text(encoding="utf-8") + 'smtp_host = "mail.example"\n')
    monkeypatch.setenv("OPRECON_CONFIG_FILE", str(cfg))
    with pytest.raises(SettingsError) as err:
        load_settings()
    message = str(err.value)
    assert "\n" not in message
    assert "'smtp_host' is a top-level setting read inside [digest_recipients]" in message
    assert "move it above the first [table]" in message


def _start_worker(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A real `celery worker` as operators start it; it must exit on its own."""
    port = free_port()  # nothing listens: the worker must stop before it connects
    values = {"OPRECON_BROKER_URL": f"redis://127.0.0.1:{port}/0",
              "OPRECON_REDIS_URL": f"redis://127.0.0.1:{port}/1",
              "OPRECON_STATE_DB_URL": f"sqlite:///{tmp_path / 'state.sqlite'}",
              "OPRECON_HEARTBEAT_DIR": str(tmp_path / "hb"), "OPRECON_METRICS_PORT": "0",
              **env}
    return subprocess.run(
        [str(BIN / "celery"), "-A", "worker.runtime.celery_app", "worker", "-c", "1"],
        env=base_env(**values), cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_worker_without_its_op_folder_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    practice = tmp_path / "practice"
    shutil.copytree(ROOT / "worker" / "devtools" / "demo_practice" / "portal",
                    practice / "portal")
    done = _start_worker(tmp_path, OPRECON_OP_DIR=str(practice / "op"),
                         OPRECON_PORTAL_DIR=str(practice / "portal"))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"oprecon: invalid setting OPRECON_OP_DIR: no folder at {practice / 'op'}")
    assert "Traceback" not in done.stdout + done.stderr


def test_worker_with_a_bad_number_stops_in_one_line_not_a_traceback(tmp_path: Path) -> None:
    done = _start_worker(tmp_path, OPRECON_PORTAL_TIMEOUT_SECONDS="ten")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("oprecon: invalid setting OPRECON_PORTAL_TIMEOUT_SECONDS")
    assert "Traceback" not in done.stdout + done.stderr
