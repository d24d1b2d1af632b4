"""`oprecon users` as an operator runs it (the installed command, password piped on
stdin), the demo-then-console path a new user follows, and digest links to the console."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tests.procs import BIN, base_env
from worker.runtime.operations import write_sessions
from worker.state.models import StaffUser
from worker.web import auth


def _run(env: dict[str, str], cwd: Path, *args: str, stdin: str = ""
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "oprecon"), *args], env=env, cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_users_add_list_set_password_remove(tmp_path: Path, make_settings: Any) -> None:
    settings = make_settings()
    env = base_env(OPRECON_STATE_DB_URL=settings.state_db_url,
                   OPRECON_PRACTICE=settings.practice, OPRECON_LOG_FORMAT="json")
    r = _run(env, tmp_path, "users", "list")
    assert r.returncode == 0 and "no console users yet" in r.stdout

    r = _run(env, tmp_path, "users", "add", "maria", "--role", "operator",
             stdin="front desk key 2026\n")
    assert (r.returncode, r.stdout.strip()) == (0, "user maria added (operator)"), r.stderr
    assert "front desk" not in r.stdout + r.stderr  # never echoed or logged

    refusals = [
        (("users", "add", "maria", "--role", "operator"), "a long password 1\n",
         "user maria already exists"),
        (("users", "add", "kim", "--role", "admin"), "a long password 1\n",
         "--role: one of viewer, operator"),
        (("users", "add", "kim", "--role", "viewer"), "short\n", "at least 12 characters"),
        (("users", "add", "kim", "--role", "viewer"), "", "no password on standard input"),
        (("users", "add", "bad name", "--role", "viewer"), "a long password 1\n",
         "user names are"),
        (("users", "remove", "nobody"), "", "no user nobody"),
    ]
    for args, stdin, message in refusals:
        r = _run(env, tmp_path, *args, stdin=stdin)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, args

    sessions = write_sessions(settings)
    with sessions() as s:
        user = s.scalar(select(StaffUser).where(StaffUser.username == "maria"))
        assert user is not None and user.password_hash.startswith("$argon2id$")
        version = user.session_version

    r = _run(env, tmp_path, "users", "set-password", "maria", stdin="a brand new secret\n")
    assert r.returncode == 0 and "sessions are over" in r.stdout
    with sessions() as s:
        user = s.scalar(select(StaffUser).where(StaffUser.username == "maria"))
        assert user is not None and user.session_version == version + 1
        assert auth.login(s, settings.practice, "maria", "a brand new secret",
                          user.created_at, 3).user is not None

    r = _run(env, tmp_path, "users", "list")
    assert r.returncode == 0 and "maria  operator" in r.stdout
    r = _run(env, tmp_path, "users", "remove", "maria")
    assert r.returncode == 0 and "user maria removed" in r.stdout
    assert "no console users yet" in _run(env, tmp_path, "users", "list").stdout


def test_on_a_terminal_the_password_is_asked_twice(tmp_path: Path, make_settings: Any) -> None:
    settings = make_settings()
    env = base_env(OPRECON_STATE_DB_URL=settings.state_db_url,
                   OPRECON_PRACTICE=settings.practice, OPRECON_LOG_FORMAT="json")

    def on_tty(*answers: str) -> tuple[int, str]:
        pid, fd = pty.fork()
        if pid == 0:  # the child: oprecon on a terminal
            os.chdir(tmp_path)
            os.execve(str(BIN / "oprecon"),
                      ["oprecon", "users", "add", "tess", "--role", "viewer"], env)
        said = b""
        for answer in answers:
            while b": " not in said.rsplit(b"\n", 1)[-1]:
                said += os.read(fd, 1024)
            os.write(fd, answer.encode() + b"\n")
            said += b"\n"
        while True:
            try:
                chunk = os.read(fd, 1024)
            except OSError:
                break
            if not chunk:
                break
            said += chunk
        _, status = os.waitpid(pid, 0)
        os.close(fd)
        return os.waitstatus_to_exitcode(status), said.decode(errors="replace")

    code, said = on_tty("first try password", "second try password")
    assert code == 2 and "the two passwords differ" in said
    code, said = on_tty("twice the same one", "twice the same one")
    assert code == 0 and "user tess added (viewer)" in said
    assert "twice the same one" not in said  # not echoed


def test_digest_items_link_to_the_family_page_by_id(make_settings: Any, tmp_path: Path
                                                   ) -> None:
    """Once a digest went out, the next one lists new items, each with its console link."""
    import io
    from datetime import UTC, datetime, timedelta

    from freezegun import freeze_time

    from tests.factory import MemorySource, contact, fc, patient
    from worker.cli.digest import preview_digests
    from worker.digest import build as b
    from worker.scan.engine import Deps, reconcile
    from worker.scan.wiring import state_sessions
    from worker.state.models import DigestSent

    assert b.family_link(make_settings(), "P1") is None  # no web_base_url: no link
    settings = make_settings(web_base_url="https://console.example/")
    assert b.family_link(settings, "P 1") == "https://console.example/families/P%201"
    # An item that names only a contact (a duplicate group) links to the contact's page.
    assert b.family_link(settings, None, "C7") == "https://console.example/contacts/C7"
    now = datetime(2026, 12, 2, 15, 0, tzinfo=UTC)
    sessions = state_sessions(settings)
    earlier = b.daily_window((now - timedelta(days=2)).date(), settings)
    with sessions.begin() as s:
        s.add(DigestSent(practice=settings.practice, recipient="preview",
                         window_key=earlier.key, status="sent", created_at=earlier.end,
                         sent_at=earlier.end))
    source = MemorySource([patient("P1", email="kid@example.org"), contact("C1"),
                           fc("P1", "C1")])
    with freeze_time(now - timedelta(hours=20)):
        reconcile(Deps(settings, sessions, source, source), kind="incremental")
    out = io.StringIO()
    html = tmp_path / "digest.html"
    with freeze_time(now):
        preview_digests(settings, sessions, now, out, html)
    assert "Console: https://console.example/families/P1" in out.getvalue()
    assert 'href="https://console.example/families/P1"' in html.read_text()
