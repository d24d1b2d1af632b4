"""Helpers for the console tests (tests/web): a console over a real world, the bundled
demo practice (OP exports with planted problems the generator did not tailor to these
tests) read against the portal simulator over HTTP, reconciled twice 15 minutes apart
with a mass-change guard so small that the second run stages its fixes; then the console
served by uvicorn on a free port, with one operator and one viewer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from tests.procs import free_port, wait_for
from worker.state.models import ActionRow, ActionStatus
from worker.web.app import make_app

OPERATOR = ("olivia", "operator-password-1")
VIEWER = ("victor", "viewer-password-12")


@dataclass
class World:
    settings: Settings
    sessions: sessionmaker[Session]
    practice: Path
    sim_url: str
    t0: datetime

    def staged_run(self) -> int:
        with self.sessions() as s:
            run_id = s.scalar(select(ActionRow.run_id).where(
                ActionRow.status == ActionStatus.STAGED).limit(1))
        assert run_id is not None
        return int(run_id)


class LiveConsole:
    """The console app under uvicorn in a thread, on a free port."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.app = make_app(settings, sessions)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                proxy_headers=True, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="console", daemon=True)
        self.clients: list[httpx.Client] = []

    def start(self) -> LiveConsole:
        self.thread.start()
        wait_for(lambda: self.server.started, 15, "the console to listen")
        return self

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.server.should_exit = True
        self.thread.join(15)

    def client(self, **kw: Any) -> httpx.Client:
        client = httpx.Client(base_url=self.url, follow_redirects=False, timeout=20, **kw)
        self.clients.append(client)
        return client

    def login(self, user: tuple[str, str]) -> httpx.Client:
        """A client with a logged-in session (through the real form and its CSRF token)."""
        client = self.client()
        page = client.get("/login", headers={"Accept": "text/html"})
        token = csrf_of(page.text)
        r = client.post("/login", data={"username": user[0], "password": user[1],
                                        "csrf_token": token, "next": "/"})
        assert r.status_code == 303, r.text
        return client


def csrf_of(html: str) -> str:
    import re

    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


