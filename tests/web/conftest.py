"""Fixtures of the console tests: the world and a live console (helpers in
tests/console_world.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from console_world import OPERATOR, VIEWER, LiveConsole, World

from worker.devtools.demo import PRACTICE, shift_practice
from worker.devtools.simulator import SimClock, Simulator, start_simulator
from worker.scan.engine import Deps, reconcile
from worker.scan.wiring import build_deps, state_sessions
from worker.web import auth


@pytest.fixture
def state_overrides() -> dict[str, Any]:
    """Settings that pick the state database: SQLite in tmp_path unless a module
    overrides this fixture (test_web_postgres.py does)."""
    return {}


@pytest.fixture
def world(tmp_path: Path, make_settings: Any, state_overrides: dict[str, Any]
          ) -> Iterator[World]:
    generated = datetime.fromisoformat(
        json.loads((PRACTICE / "generator.json").read_text())["now"])
    # Like `oprecon demo`, the world happens now: the pages (and the screenshots in docs/)
    # show ages of minutes, as staff would see them, not weeks.
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=15)
    practice = shift_practice(PRACTICE, tmp_path / "practice", t0 - generated)
    clock = SimClock(t0)
    simulator = Simulator(clock=clock, seed=1)
    simulator.load_portal_dir(practice / "portal", op_dir=practice / "op")
    server, url = start_simulator(simulator)
    try:
        settings = make_settings(
            op_dir=practice / "op", portal_source="http", portal_url=url,
            mass_change_max_fixes=1, mass_change_max_percent=0, mass_change_min_fixes=0,
            web_base_url="https://console.example", **state_overrides,
        )
        sessions = state_sessions(settings)
        deps: Deps = build_deps(settings, sessions=sessions)
        try:
            for at in (t0, t0 + timedelta(minutes=15)):
                clock.set(at)
                reconcile(deps, kind="incremental", now=at)
        finally:
            deps.portal.close()  # type: ignore[attr-defined]
        with sessions.begin() as s:
            auth.add_user(s, settings.practice, OPERATOR[0], "operator", OPERATOR[1], t0)
            auth.add_user(s, settings.practice, VIEWER[0], "viewer", VIEWER[1], t0)
        yield World(settings, sessions, practice, url, t0)
        # The engine is cached per URL: close its pooled connections now, before the
        # session's throw-away PostgreSQL database is dropped under them.
        sessions.kw["bind"].dispose()
    finally:
        server.shutdown()
        simulator.close()


@pytest.fixture
def console(world: World) -> Iterator[LiveConsole]:
    live = LiveConsole(world.settings, world.sessions).start()
    try:
        yield live
    finally:
        live.stop()
