"""`oprecon demo`: the whole job on the embedded default, in a few seconds.

The bundled demo practice (OP and portal exports with planted problems and their
manifest) is read from CSV for OP and through the portal simulator over real HTTP for
the portal, with a SQLite state database. Time is simulated: a first read, a second one
15 minutes later that confirms and fixes, and a third once the portal has caught up,
which verifies the fixes. The result is scored against the manifest.

The simulated 40 minutes end now: the practice was generated at a fixed time
(`generator.json` "now"), so its exports are copied next to the state database with
every timestamp moved by the same amount (`shift_practice`), and the demo runs in that
copy's time. The state database then holds real, recent times, and `oprecon status`,
the console and the digest preview show a run that finished minutes ago, not weeks.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import typer

from config.settings import load_settings
from worker.checks.catalog import BY_ID
from worker.checks.remedies import REMEDIES
from worker.fixes.apply import TransientPortalError, apply_action
from worker.runtime.logging import setup_logging
from worker.scan.engine import Deps, RunResult, reconcile, time_rules
from worker.scan.planner import Decision
from worker.scan.report import summary_line, table
from worker.scan.wiring import state_sessions
from worker.sources.csv_source import CsvOPSource
from worker.sources.portal_http import HttpPortal

# Written by `oprecon generate --patients 150 --seed 7 --now 2026-11-02T14:00:00+00:00`;
# the console tests (tests/web) and docs/ name its ids: regenerate them together.
PRACTICE = Path(__file__).resolve().parent / "demo_practice"
STATE_DB = Path("var") / "demo.sqlite"


def _load_manifest(practice: Path) -> tuple[datetime, dict[str, dict[str, Any]]]:
    meta = json.loads((practice / "generator.json").read_text())
    now = datetime.fromisoformat(meta["now"])
    expected = {}
    with (practice / "manifest.jsonl").open() as fh:
        for line in fh:
            if line.strip():
                obj = json.loads(line)
                expected[obj["fingerprint"]] = obj
    return now, expected


def _step(deps: Deps, clock: Any, at: datetime, title: str) -> RunResult:
    clock.set(at)
    result = reconcile(deps, kind="demo", now=at)
    outcomes: Counter[str] = Counter()
    for action_id in result.action_ids:
        try:
            outcomes[apply_action(deps.sessions, deps.portal, action_id,
                                  time_rules(deps.settings), now=lambda: at,
                                  op=deps.op)] += 1
        except TransientPortalError:
            outcomes["retrying"] += 1
    typer.echo(f"\n== {at:%H:%M} UTC — {title}")
    s = result.summary()
    typer.echo(
        f"   read {s['records']} records in {s['read_seconds']}s; {s['findings']} findings "
        f"({s['new']} new, {s['resolved']} resolved)"
    )
    typer.echo(f"   {summary_line(result)}")
    if outcomes:
        typer.echo("   fixes sent to the portal: "
                   + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())))
    return result


# An ISO 8601 time with its offset, as the exports write `updated_at`, `created_at`,
# `last_sync_at` and `at`; dates of birth have no time and are never matched.
_TIMESTAMP = re.compile(
    r"\b(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2}))")
DEMO_MINUTES = 40  # first read, confirmation at +15, verification at +40


def shift_practice(src: Path, dest: Path, delta: timedelta) -> Path:
    """Copy a practice's exports to `dest` with every timestamp moved by `delta`.

    Text-level, so every other byte (a planted bad value included) is kept as it is; a
    time that does not parse is left alone, as the exports' reader would report it."""
    def move(m: re.Match[str]) -> str:
        text = m.group(1)
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            return text
        return (at + delta).isoformat()

    for folder in ("op", "portal"):
        (dest / folder).mkdir(parents=True, exist_ok=True)
        for path in sorted((src / folder).glob("*.csv")):
            text = path.read_text(encoding="utf-8")
            (dest / folder / path.name).write_text(_TIMESTAMP.sub(move, text), encoding="utf-8")
    return dest


def run_demo(*, keep: bool = False, practice: Path = PRACTICE, state_db: Path = STATE_DB,
             end: datetime | None = None) -> None:
    """Run the demo so that its last read is at `end` (default: now)."""
    from worker.devtools.simulator import SimClock, Simulator, start_simulator

    state_db = state_db.resolve()  # engines are cached per URL: never a relative path
    if not keep and state_db.exists():
        state_db.unlink()
    state_db.parent.mkdir(parents=True, exist_ok=True)
    settings = load_settings(
        state_db_url=f"sqlite:///{state_db}",
        log_level="WARNING",  # the demo prints its own story; warnings still show
        mass_change_max_fixes=1000,  # the demo practice is tiny and deliberately broken
        mass_change_max_percent=0,
    )
    setup_logging(settings.log_level, settings.log_format)
    generated, expected = _load_manifest(practice)
    end = (end or datetime.now(UTC)).replace(microsecond=0)
    t0 = end - timedelta(minutes=DEMO_MINUTES)
    exports = shift_practice(practice, state_db.parent / "demo-practice", t0 - generated)
    clock = SimClock(t0)
    simulator = Simulator(clock=clock, seed=1)
    simulator.load_portal_dir(exports / "portal", op_dir=exports / "op")
    server, url = start_simulator(simulator)
    portal = HttpPortal(url, None)
    portal_dir = state_db.parent / "demo-portal"
    try:
        deps = Deps(settings, state_sessions(settings), CsvOPSource(exports / "op"), portal,
                    portal_writable=True)
        typer.echo(f"oprecon demo — practice {practice.name}: OP exports + portal simulator "
                   f"at {url}, state in {state_db}; its {DEMO_MINUTES} simulated minutes "
                   "end now")
        runs = [
            _step(deps, clock, t0, "first read: OP-only problems alerted, portal "
                  "mismatches wait for a second read"),
            _step(deps, clock, t0 + timedelta(minutes=15),
                  "15 minutes later: mismatches confirmed, safe fixes sent"),
            _step(deps, clock, t0 + timedelta(minutes=DEMO_MINUTES),
                  f"{DEMO_MINUTES} minutes: holds ended, fixes verified against a fresh read"),
        ]
        _export_portal(portal, portal_dir)
    finally:
        portal.close()
        server.shutdown()
        simulator.close()
    _report(runs, expected)
    config = _write_console_config(state_db, exports, portal_dir)
    typer.echo(
        f"\nExplore: OPRECON_STATE_DB_URL=sqlite:///{state_db} oprecon findings "
        "(or status, digest --preview)"
    )
    typer.echo(
        f"Staff console: export OPRECON_CONFIG_FILE={config}, then "
        "oprecon users add NAME --role operator and oprecon web"
    )


def _report(runs: list[RunResult], expected: dict[str, dict[str, Any]]) -> None:
    first, last = runs[0], runs[-1]
    seen = {i.finding.fingerprint: i for i in first.plan.items}
    found_by: Counter[str] = Counter()
    exp_by: Counter[str] = Counter(o["check"] for o in expected.values())
    extra_by: Counter[str] = Counter()
    for fp, item in seen.items():
        (found_by if fp in expected else extra_by)[item.finding.check] += 1
    staff = {Decision.ALERT, Decision.ESCALATED, Decision.STAGED}
    final = Counter((i.finding.check, i.decision in staff) for i in last.plan.items)
    rows = [
        (cid, exp_by[cid], found_by[cid], extra_by[cid],
         final[(cid, False)] + final[(cid, True)], final[(cid, True)])
        for cid in BY_ID
        if exp_by[cid] or found_by[cid] or extra_by[cid]
    ]
    typer.echo("\nFindings of the first read against the manifest of planted problems:")
    typer.echo(table(["check", "planted", "found", "unexpected", "open at end", "for staff"],
                     rows))
    planted, found = sum(exp_by.values()), sum(found_by.values())
    resolved = sum(r.sync.resolved for r in runs)
    typer.echo(f"\nrecall {found}/{planted}, unexpected findings {sum(extra_by.values())}; "
               f"{resolved} finding(s) fixed and verified; still for staff:")
    for item in sorted(last.plan.items, key=lambda i: i.finding.check):
        if item.decision in staff:
            f = item.finding
            typer.echo(f"  ! {f.check}: {f.detail}")
            typer.echo(f"      first step: {REMEDIES[f.check][0]}")


_PORTAL_FILES = {
    "portal_users.csv": ("users", ["user_id", "op_patient_id", "op_contact_id", "first_name",
                                   "last_name", "email", "role", "active", "updated_at"]),
    "portal_links.csv": ("links", ["caregiver_user_id", "dependent_user_id", "created_at"]),
    "portal_sources.csv": ("sources", ["user_id", "status", "last_sync_at"]),
    "portal_audit.csv": ("audit", ["at", "action", "user_id", "email"]),
}


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _export_portal(portal: Any, dest: Path) -> None:
    """The simulator's portal as it stands at the end, as CSV exports: the console's
    family page reads them (with the bundled OP exports) after the simulator is gone."""
    import csv

    from worker.model.records import InvalidRecord

    dest.mkdir(parents=True, exist_ok=True)
    for name, (method, columns) in _PORTAL_FILES.items():
        with (dest / name).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            for record in getattr(portal, method)():
                if not isinstance(record, InvalidRecord):
                    writer.writerow([_csv_value(getattr(record, c)) for c in columns])


def _write_console_config(state_db: Path, practice: Path, portal_dir: Path) -> Path:
    """Settings for `oprecon users` and `oprecon web` on the demo's state and exports."""
    path = state_db.parent / "demo.toml"
    path.write_text(
        "# Written by `oprecon demo`: the console on the demo's state database and exports.\n"
        f"state_db_url = {json.dumps(f'sqlite:///{state_db}')}\n"
        f"op_dir = {json.dumps(str((practice / 'op').resolve()))}\n"
        f"portal_dir = {json.dumps(str(portal_dir.resolve()))}\n",
        encoding="utf-8",
    )
    return path
