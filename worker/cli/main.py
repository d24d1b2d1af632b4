"""`oprecon`: the command line operators, on-call and scripts use.

Exit status: 0 when the command completed (whatever it found), 1 when a run started
and failed, 2 when it could not start; the reason is one line on stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from config.settings import Settings, SettingsError, load_settings
from worker.cli.errors import CannotStart
from worker.runtime.operations import OperationRefused

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Reconcile OP family contacts with OP Portal access.",
    pretty_exceptions_enable=False,
)
fixes_app = typer.Typer(help="Staged fix batches held back by the mass-change guard, and the "
                              "audit of fixes applied.")
app.add_typer(fixes_app, name="fixes")
users_app = typer.Typer(help="Staff accounts of the web console (oprecon web).")
app.add_typer(users_app, name="users")


def _settings(**overrides: Any) -> Settings:
    from config.settings import unknown_env
    from worker.runtime.logging import setup_logging

    settings = load_settings(**overrides)
    setup_logging(settings.log_level, settings.log_format)
    unknown = unknown_env()
    if unknown:  # a typo'd variable silently leaves its setting at the default
        typer.echo(f"oprecon: warning: unknown environment variable(s) {', '.join(unknown)}: "
                   "no setting reads them (a typo?)", err=True)
    return settings


def _id_option(option: str, value: str | None) -> str | None:
    """An id given on the command line, held to the sources' rules: it reaches URL
    paths, mail subjects and terminal lines."""
    from worker.model.text import id_problem, strip_controls

    if value is None:
        return None
    value = value.strip()
    why = id_problem(value) if value else "is blank"
    if why is not None:
        raise CannotStart(f"{option}: not an id ({strip_controls(value)[:64]!r} {why})")
    return value


def _parse_now(value: str | None, option: str = "--now") -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as err:
        raise CannotStart(f"{option}: not an ISO 8601 date or time (2026-12-31 or "
                          f"2026-12-31T17:00): {value}") from err
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _print_json_lines(objs: Any) -> None:
    for obj in objs:
        sys.stdout.write(json.dumps(obj) + "\n")


# -- reconcile ---------------------------------------------------------------------------


@app.command()
def reconcile(
    all_: Annotated[bool, typer.Option("--all", help="Every patient and contact.")] = False,
    patient: Annotated[str | None, typer.Option(help="One OP patient id.")] = None,
    contact: Annotated[str | None, typer.Option(help="One OP contact id.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; change nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per finding.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait for the worker to finish and show it.")] = False,
    local: Annotated[bool, typer.Option(help="Run in this process instead of the worker.")] = False,
    op_dir: Annotated[Path | None, typer.Option(help="Read OP from these CSV exports.")] = None,
    portal_dir: Annotated[
        Path | None, typer.Option(help="Read the portal from CSV exports.")
    ] = None,
    now: Annotated[str | None, typer.Option(hidden=True)] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Print remedy steps.")] = False,
    timeout: Annotated[float | None, typer.Option(
        min=1, help="With --wait: give up after this many seconds.")] = None,
) -> None:
    """Reconcile everything, one patient's family, or one contact."""
    patient = _id_option("--patient", patient)
    contact = _id_option("--contact", contact)
    chosen = [x for x in (all_, patient, contact) if x]
    if len(chosen) != 1:
        raise CannotStart("choose exactly one of --all, --patient ID, --contact ID")
    from worker.scan.engine import ScopeRequest

    request = (
        ScopeRequest("patient", patient) if patient
        else ScopeRequest("contact", contact) if contact
        else ScopeRequest()
    )
    settings = _settings()
    in_process = local or dry_run or op_dir is not None or portal_dir is not None
    if not in_process:
        from worker.cli.ondemand import enqueue_and_wait

        code = enqueue_and_wait(settings, request, wait=wait, as_json=as_json, timeout=timeout)
        raise typer.Exit(code)
    _reconcile_here(settings, request, dry_run, as_json, op_dir, portal_dir, _parse_now(now),
                    verbose)


def _reconcile_here(
    settings: Settings, request: Any, dry_run: bool, as_json: bool, op_dir: Path | None,
    portal_dir: Path | None, now: datetime | None, verbose: bool,
) -> None:
    from worker.scan.engine import reconcile as run
    from worker.scan.report import render_plan, render_trace
    from worker.scan.wiring import build_deps, dry_run_sessions

    if (op_dir is None) != (portal_dir is None):
        raise CannotStart("--op-dir and --portal-dir go together")
    sessions = dry_run_sessions(settings) if dry_run else None
    deps = build_deps(settings, op_dir=op_dir, portal_dir=portal_dir, sessions=sessions)
    if request.kind == "all":
        result = run(deps, request, kind="adhoc", dry_run=dry_run, now=now)
    else:
        # One family: read its neighbourhood only, as the worker's on-call run does. No
        # lock: this process is the only writer it knows of (the worker takes its own).
        from worker.scan.incremental import family_reconcile, family_seeds

        result = family_reconcile(deps, family_seeds(request), request, kind="adhoc",
                                  guard=lambda _read_at, _scope: contextlib.nullcontext(),
                                  now=now, dry_run=dry_run)
    if deps.portal_writable and result.action_ids:
        from worker.fixes.apply import TransientPortalError, apply_action
        from worker.scan.engine import time_rules

        for action_id in result.action_ids:
            # A transient failure stays `retrying` in the journal; the worker resumes it.
            with contextlib.suppress(TransientPortalError):
                apply_action(deps.sessions, deps.portal, action_id, time_rules(settings),
                             op=deps.op, lease=settings.fix_lease)
    if as_json:
        _print_json_lines(item.to_json() for item in result.plan.items)
        return
    if request.kind != "all":
        typer.echo(f"Steps for {request.label}:")
        typer.echo(render_trace(result))
        typer.echo("")
    typer.echo(render_plan(result, verbose=verbose or request.kind != "all"))


# -- the demo ------------------------------------------------------------------------------


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="Keep the previous demo state database.")] = False,
) -> None:
    """The main job on the embedded default: SQLite + the bundled demo practice."""
    from worker.devtools.demo import run_demo

    run_demo(keep=keep)


# -- duplicates, generate, bench -----------------------------------------------------------


@app.command()
def duplicates(
    contacts: Annotated[Path, typer.Option(help="A contacts.csv export.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Duplicate-contact groups in a contacts export."""
    from worker.checks.duplicates import duplicate_findings
    from worker.model.records import Contact
    from worker.scan.report import table
    from worker.sources.csv_source import read_contacts_file

    records = [r for r in read_contacts_file(contacts) if isinstance(r, Contact)]
    found = list(duplicate_findings(records, _settings().duplicate_match_threshold))
    if as_json:
        _print_json_lines(f.to_json() for f in found)
        return
    typer.echo(f"{len(found)} duplicate group(s) among {len(records)} contacts")
    if found:
        typer.echo(
            table(["contact ids", "why"], [(", ".join(f.contact_ids), f.detail) for f in found])
        )


@app.command()
def generate(
    patients: Annotated[int, typer.Option(min=1, max=2_000_000)],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    seed: Annotated[int, typer.Option()] = 0,
    now: Annotated[str | None, typer.Option(help="Reference time (ISO 8601).")] = None,
) -> None:
    """Write a synthetic practice: DIR/op/, DIR/portal/ and DIR/manifest.jsonl."""
    from worker.devtools.generator import generate_practice

    result = generate_practice(out, patients=patients, seed=seed, now=_parse_now(now))
    typer.echo(f"wrote {out} ({result})")


@app.command()
def bench(
    patients: Annotated[int, typer.Option(min=100)] = 10_000,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Measure the read floor against a full reconcile."""
    from worker.devtools.bench import run_bench

    run_bench(patients=patients, as_json=as_json)


# -- state: findings, silence, pause, fixes, status, health ---------------------------------


@app.command()
def migrate() -> None:
    """Create or upgrade the state database schema."""
    from worker.state.db import migrate as upgrade

    settings = _settings()
    upgrade(settings.state_db_url)
    typer.echo("state database is up to date")


@app.command()
def findings(
    check: Annotated[str | None, typer.Option(help="Only this check id.")] = None,
    state: Annotated[str | None, typer.Option(help="Only this state.")] = None,
    patient: Annotated[str | None, typer.Option(help="Only findings about this chart.")] = None,
    contact: Annotated[str | None, typer.Option(
        help="Only findings naming this contact (duplicate groups included).")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    as_csv: Annotated[bool, typer.Option(
        "--csv", help="CSV for spreadsheets (formula-like cells start with ').")] = False,
    limit: Annotated[int, typer.Option()] = 200,
) -> None:
    """Findings held in the state database."""
    from worker.cli.state import list_findings

    list_findings(_settings(), check, state, as_json, limit,
                  patient=_id_option("--patient", patient),
                  contact=_id_option("--contact", contact), as_csv=as_csv)


@app.command()
def history(
    target: Annotated[str, typer.Argument(metavar="ID", help="A patient, contact or portal "
                                                              "user id.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A family's timeline: what oprecon saw and did, with run ids and reasons."""
    from worker.cli.audit import show_history
    from worker.cli.state import read_sessions

    settings = _settings()
    show_history(settings, _id_option("ID", target) or target, as_json, sys.stdout,
                 read_sessions(settings))


@app.command()
def silence(
    fingerprint: str,
    until: Annotated[str, typer.Option(help="Date or time (ISO 8601) the silence ends.")],
    reason: Annotated[str, typer.Option(help="Why; shown in digests and status.")],
    by: Annotated[str, typer.Option(help="Who silenced it.")] = "on-call",
) -> None:
    """Silence one finding until a date."""
    from worker.cli.state import set_silence

    set_silence(_settings(), fingerprint, _parse_now(until, "--until"), reason, by)


@app.command()
def unsilence(fingerprint: str) -> None:
    """End a silence now."""
    from worker.cli.state import set_silence

    set_silence(_settings(), fingerprint, None, None, None)


@app.command()
def pause(reason: Annotated[str, typer.Option()] = "paused by on-call") -> None:
    """Stop all fixes at once (detection and digests go on)."""
    from worker.cli.state import set_paused

    set_paused(_settings(), True, reason)


@app.command()
def resume() -> None:
    """Let fixes run again."""
    from worker.cli.state import set_paused

    set_paused(_settings(), False, "resumed")


@fixes_app.command("list")
def fixes_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Runs whose fixes the mass-change guard holds, with counts and why."""
    from worker.cli.state import list_staged

    list_staged(_settings(), as_json)


@fixes_app.command("show")
def fixes_show(run: int, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Each staged fix of a run and the finding it is for, before approving it."""
    from worker.cli.state import show_staged

    show_staged(_settings(), run, as_json)


@fixes_app.command("applied")
def fixes_applied(
    since: Annotated[str | None, typer.Option(
        help="From this date or time (ISO 8601), or a span back: 7d (default), 12h, 30m."
    )] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """What oprecon changed in the portal, when, and with what outcome."""
    from worker.cli.audit import parse_since, show_applied
    from worker.cli.state import read_sessions
    from worker.scan.engine import utcnow

    settings = _settings()
    now = utcnow()
    show_applied(settings, parse_since(since, now), as_json, sys.stdout,
                 read_sessions(settings), now)


@fixes_app.command("approve")
def fixes_approve(run: int) -> None:
    """Release a staged batch: its fixes are queued on the worker (applied here if the
    broker does not answer)."""
    from worker.fixes.staging import release_staged
    from worker.runtime.dispatch import send_fixes

    release_staged(_settings(), run, approve=True, enqueue=send_fixes)


@fixes_app.command("reject")
def fixes_reject(run: int) -> None:
    """Drop a staged batch: nothing is applied."""
    from worker.fixes.staging import release_staged

    release_staged(_settings(), run, approve=False)


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Last runs, what is due, queues, holds, pause and breaker, last success."""
    from worker.cli.state import show_status

    show_status(_settings(), as_json)


@app.command()
def health(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    process: Annotated[str | None, typer.Option(
        help="worker|beat: only this container's heartbeat file (docker healthcheck).")] = None,
) -> None:
    """Worker and beat liveness, and the age of the last successful scan."""
    from worker.cli.state import show_health

    raise typer.Exit(show_health(_settings(), as_json, process))


@app.command()
def digest(
    preview: Annotated[bool, typer.Option("--preview", help="Render without sending.")] = False,
    html: Annotated[Path | None, typer.Option(help="Write the HTML part here.")] = None,
    test: Annotated[str | None, typer.Option(
        "--test", metavar="RECIPIENT",
        help="Send a short test message now to this configured recipient (or 'webhook').",
    )] = None,
) -> None:
    """Render the next digest (with --preview), send a test message (--test), or send
    the digests that are due."""
    from worker.cli.digest import digest_command

    digest_command(_settings(), preview=preview, html=html, test=test)


def flower_argv(settings: Settings, address: str, port: int) -> tuple[list[str], dict[str, str]]:
    """Flower on this app, behind basic auth from OPRECON_FLOWER_USER/PASSWORD (passed in
    Flower's environment, not on the command line where `ps` shows it)."""
    import importlib.util
    import os

    if settings.flower_password is None or not settings.flower_password.get_secret_value():
        raise CannotStart("invalid setting OPRECON_FLOWER_PASSWORD: required: Flower shows "
                          "every task and is never served without basic auth")
    if importlib.util.find_spec("flower") is None:
        raise CannotStart("Flower is not installed: pip install -e '.[flower]'")
    argv = [sys.executable, "-m", "celery", "-A", "worker.runtime.celery_app", "flower",
            f"--address={address}", f"--port={port}"]
    env = {**os.environ, "FLOWER_BASIC_AUTH":
           f"{settings.flower_user}:{settings.flower_password.get_secret_value()}"}
    return argv, env


@app.command()
def flower(
    address: Annotated[str, typer.Option(help="Listen address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 5555,
) -> None:
    """Celery's Flower dashboard without Docker, behind basic auth (needs the `flower`
    extra)."""
    import os

    argv, env = flower_argv(_settings(), address, port)
    os.execve(argv[0], argv, env)


# -- the staff console --------------------------------------------------------------------


@app.command()
def web(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
) -> None:
    """Serve the staff console (login required; GET /healthz is open)."""
    import uvicorn

    from worker.runtime.operations import write_sessions
    from worker.web.app import make_app

    settings = _settings()
    application = make_app(settings, write_sessions(settings))
    typer.echo(f"oprecon console for practice {settings.practice} on http://{host}:{port}/ "
               "(oprecon users add NAME --role operator makes an account)")
    # proxy_headers: behind a TLS proxy on this host, X-Forwarded-Proto makes cookies Secure.
    uvicorn.run(application, host=host, port=port, proxy_headers=True, log_level="warning",
                server_header=False)


def _read_password(confirm: bool = True) -> str:
    """One line from a pipe; on a terminal, asked twice without echo."""
    import getpass

    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Again: ") != first:
            raise CannotStart("the two passwords differ")
        return first
    line = sys.stdin.readline()
    if not line:
        raise CannotStart("no password on standard input")
    return line.rstrip("\r\n")


def _users_call(fn: Any) -> Any:
    from worker.runtime.operations import write_sessions
    from worker.web.auth import UserError

    settings = _settings()
    try:
        with write_sessions(settings).begin() as session:
            return fn(session, settings)
    except UserError as err:
        raise CannotStart(str(err)) from err


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="The user name staff log in with.")],
    role: Annotated[str, typer.Option(help="viewer (read only) or operator (may act).")],
) -> None:
    """Create a staff account; the password is read from standard input."""
    from worker.scan.engine import utcnow
    from worker.web.auth import ROLES, add_user

    if role not in ROLES:
        raise CannotStart(f"--role: one of {', '.join(ROLES)}")
    password = _read_password()
    _users_call(lambda s, st: add_user(s, st.practice, name, role, password, utcnow()))
    typer.echo(f"user {name} added ({role})")


@users_app.command("list")
def users_list() -> None:
    """Staff accounts with their role and last login."""
    from worker.scan.report import table
    from worker.web.auth import list_users

    rows = _users_call(lambda s, st: [
        (u.username, u.role, u.created_at.strftime("%Y-%m-%d %H:%MZ"),
         u.last_login_at.strftime("%Y-%m-%d %H:%MZ") if u.last_login_at else "never")
        for u in list_users(s, st.practice)])
    if not rows:
        typer.echo("no console users yet: oprecon users add NAME --role operator")
        return
    typer.echo(table(["user", "role", "created", "last login"], rows))


@users_app.command("remove")
def users_remove(name: Annotated[str, typer.Argument()]) -> None:
    """Delete a staff account; its sessions end at their next request."""
    from worker.web.auth import remove_user

    _users_call(lambda s, st: remove_user(s, st.practice, name))
    typer.echo(f"user {name} removed")


@users_app.command("set-password")
def users_set_password(name: Annotated[str, typer.Argument()]) -> None:
    """Change a password (read from standard input); ends that user's sessions."""
    from worker.scan.engine import utcnow
    from worker.web.auth import set_password

    password = _read_password()
    _users_call(lambda s, st: set_password(s, st.practice, name, password, utcnow()))
    typer.echo(f"password of {name} changed; their sessions are over")


def _one_line(err: BaseException) -> str:
    """The first line of an error: database drivers add hints and links on more lines
    (psycopg's "Is the server running…", SQLAlchemy's "Background on this error…")."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), "")


def main() -> None:
    from config.settings import get_settings
    from worker.model.text import TerminalText
    from worker.sources.base import SourceError

    out = sys.stdout
    # Every line oprecon prints may carry ids and details read from outside: an escape
    # sequence or a carriage return there would act on the terminal. (stderr carries
    # one-line errors built from checked ids, and the log handler keeps its own stream.)
    sys.stdout = TerminalText(out)
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except (CannotStart, OperationRefused, SettingsError, SourceError) as err:
        typer.echo(f"oprecon: {_one_line(err)}", err=True)
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 — one line, never a traceback, for operators
        # A usage error (unknown option, missing value): typer raises its own vendored
        # click's exceptions, so test for the shape, not the class.
        show = getattr(err, "show", None)
        if callable(show) and isinstance(getattr(err, "exit_code", None), int):
            show()
            sys.exit(2)
        typer.echo(f"oprecon: could not run: {type(err).__name__}: {_one_line(err)}", err=True)
        sys.exit(2)
    finally:
        sys.stdout = out
        get_settings.cache_clear()


if __name__ == "__main__":
    main()
