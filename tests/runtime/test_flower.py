"""Flower without Docker (issue 16): `oprecon flower` serves Celery's dashboard behind
basic auth from OPRECON_FLOWER_USER / OPRECON_FLOWER_PASSWORD, and refuses without a
password. A real Flower process against the test broker."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from tests.conftest import BROKER_URL, REDIS_URL
from tests.procs import BIN, base_env, free_port, wait_for


def test_flower_refuses_to_start_without_a_password(tmp_path: Path) -> None:
    done = subprocess.run([str(BIN / "oprecon"), "flower"], env=base_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("oprecon: invalid setting OPRECON_FLOWER_PASSWORD: "
                                   "required: Flower shows every task and is never served "
                                   "without basic auth")


def test_flower_serves_behind_the_configured_basic_auth(tmp_path: Path) -> None:
    port = free_port()
    env = base_env(OPRECON_BROKER_URL=BROKER_URL, OPRECON_REDIS_URL=REDIS_URL,
                   OPRECON_FLOWER_USER="ops", OPRECON_FLOWER_PASSWORD="flower-pw",
                   OPRECON_METRICS_PORT="0")
    proc = subprocess.Popen([str(BIN / "oprecon"), "flower", "--port", str(port)], env=env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}/"

    def answers() -> int | None:
        if proc.poll() is not None:
            raise AssertionError(f"flower exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            return httpx.get(url, timeout=2).status_code
        except httpx.HTTPError:
            return None

    try:
        assert wait_for(answers, 40, "Flower to answer") == 401
        assert httpx.get(url, auth=("ops", "wrong"), timeout=5).status_code == 401
        assert httpx.get(url, auth=("ops", "flower-pw"), timeout=5).status_code == 200
        with open(f"/proc/{proc.pid}/cmdline", "rb") as cmdline:
            assert b"flower-pw" not in cmdline.read()  # not on the command line
    finally:
        proc.terminate()
        proc.communicate(timeout=15)  # reaps it and closes the stderr pipe
