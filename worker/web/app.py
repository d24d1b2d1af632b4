"""The console's routes: a login, three pages, a batch page and the operator actions.

Every page but `/healthz`, `/login` and `/static/` needs a session; without one an HTML
request is sent to `/login` and anything else gets 401, before any handler runs. Every
POST checks the CSRF token first, then the role, then acts through the same functions as
the CLI and writes an audit entry in the same transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from config.settings import Settings, SettingsError
from worker.runtime.operations import OperationRefused
from worker.scan.engine import utcnow
from worker.sources.base import SourceError
from worker.state.models import AuditEntry, StaffUser
from worker.web import auth, views
from worker.web.security import (
    COOKIE,
    CSRF_FIELD,
    HEADERS,
    SessionData,
    Signer,
    csrf_ok,
    secret_key,
)

log = structlog.get_logger(__name__)
HERE = Path(__file__).resolve().parent
PUBLIC = {"/healthz", "/login"}
ID = r"[A-Za-z0-9_.:-]{1,64}"
Handler = Callable[[Request], Awaitable[Response]]


class Console:
    """The app's state: settings, the state database and the cookie signer."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.signer = Signer(secret_key(settings, sessions, utcnow()))
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.tz = ZoneInfo(settings.digest_timezone)

    # -- helpers -----------------------------------------------------------------------

    def page(self, request: Request, name: str, code: int = 200, **ctx: Any) -> Response:
        data: SessionData = request.state.session
        flash, data.flash = data.flash, None
        user: StaffUser | None = request.state.user
        ctx.update(user=user, csrf=data.csrf, csrf_field=CSRF_FIELD, flash=flash,
                   operator=bool(user and user.role == "operator"), path=request.url.path)
        return self.templates.TemplateResponse(request, name, ctx, status_code=code)

    def audit(self, session: Session, request: Request, action: str, *,
              patient_id: str | None = None, target: str | None = None,
              reason: str | None = None, outcome: str | None = None) -> None:
        user: StaffUser = request.state.user
        session.add(AuditEntry(practice=self.settings.practice, at=utcnow(),
                               username=user.username, action=action, patient_id=patient_id,
                               target=target, reason=reason, outcome=outcome))
        log.info("console_action", action=action, user=user.username, patient_id=patient_id,
                 target=target)


async def form_for(request: Request, operator: bool = True) -> dict[str, str] | Response:
    """The posted form once its CSRF token matched (and, for operator actions, the user is
    an operator); otherwise the refusal to send back."""
    form = await request.form()
    data: SessionData = request.state.session
    if not csrf_ok(data.csrf, form.get(CSRF_FIELD)):
        return PlainTextResponse("refused: missing or wrong CSRF token (reload the page)",
                                 status_code=403)
    user: StaffUser | None = request.state.user
    if operator and (user is None or user.role != "operator"):
        return PlainTextResponse("refused: this needs the operator role", status_code=403)
    return {k: v for k, v in form.items() if isinstance(v, str)}


def back_to(value: str | None, default: str = "/") -> str:
    """Only a path on this site (never //host or a scheme): no open redirect."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return default


def wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def make_app(settings: Settings, sessions: sessionmaker[Session] | None = None) -> Starlette:
    from worker.runtime.operations import write_sessions

    console = Console(settings, sessions or write_sessions(settings))
    idle = timedelta(minutes=settings.web_session_idle_minutes).total_seconds()

    def load_user(data: SessionData, now: datetime) -> StaffUser | None:
        if data.user_id is None or now.timestamp() - data.seen > idle:
            return None
        with console.sessions() as session:
            user = session.get(StaffUser, data.user_id)
            if user is None or user.practice != settings.practice \
                    or user.session_version != data.version:
                return None
            session.expunge(user)
            return user

    class Guard(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: Any) -> Response:
            path = request.url.path
            if path == "/healthz" or path.startswith("/static/"):
                response = await call_next(request)
                response.headers.update(HEADERS)
                return response
            now = utcnow()
            data = console.signer.loads(request.cookies.get(COOKIE))
            user = await run_in_threadpool(load_user, data, now) if data else None
            if data is None or (data.user_id is not None and user is None):
                data = SessionData()  # a new session, and a new CSRF token
            request.state.session = data
            request.state.user = user
            if user is None and path not in PUBLIC:
                if wants_html(request):
                    response = RedirectResponse(f"/login?next={quote(path)}", status_code=303)
                else:
                    response = JSONResponse({"error": "login required"}, status_code=401)
            else:
                response = await call_next(request)
            data = request.state.session  # login and logout replace it
            if data.user_id is not None and request.state.user is not None:
                data.seen = now.timestamp()
            response.set_cookie(
                COOKIE, console.signer.dumps(data), httponly=True, samesite="lax",
                secure=request.url.scheme == "https", path="/",
            )
            response.headers.update(HEADERS)
            response.headers["Cache-Control"] = "no-store"
            if request.url.scheme == "https":
                response.headers["Strict-Transport-Security"] = "max-age=31536000"
            return response

    # -- public ------------------------------------------------------------------------

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def login_page(request: Request) -> Response:
        if request.state.user is not None:
            return RedirectResponse(back_to(request.query_params.get("next")), 303)
        return console.page(request, "login.html", next=back_to(request.query_params.get("next")))

    async def login_post(request: Request) -> Response:
        form = await form_for(request, operator=False)
        if isinstance(form, Response):
            return form
        name, password = form.get("username", "").strip(), form.get("password", "")
        nxt = back_to(form.get("next"))

        def check() -> auth.LoginResult:
            with console.sessions.begin() as session:
                result = auth.login(session, settings.practice, name, password, utcnow(),
                                    settings.web_login_free_failures)
                if result.user is not None:
                    session.flush()
                    session.expunge(result.user)
                return result

        result = await run_in_threadpool(check)
        if result.user is None:
            log.info("console_login_refused", waited=result.wait_seconds > 0)
            error = (f"Too many failed logins: try again in {result.wait_seconds} s."
                     if result.wait_seconds else "Wrong user name or password.")
            return console.page(request, "login.html", 429 if result.wait_seconds else 401,
                                error=error, next=nxt, username=name)
        log.info("console_login", user=result.user.username)
        request.state.session = SessionData(user_id=result.user.id,
                                            version=result.user.session_version)
        request.state.user = result.user
        return RedirectResponse(nxt, status_code=303)

    async def logout(request: Request) -> Response:
        form = await form_for(request, operator=False)
        if isinstance(form, Response):
            return form
        user: StaffUser | None = request.state.user

        def end_sessions() -> None:
            # The cookie lives in the browser: a copy of it must stop working too.
            if user is not None:
                with console.sessions.begin() as session:
                    row = session.get(StaffUser, user.id)
                    if row is not None:
                        row.session_version += 1

        await run_in_threadpool(end_sessions)
        request.state.session = SessionData()
        request.state.user = None
        return RedirectResponse("/login", status_code=303)

    # -- pages -------------------------------------------------------------------------

    async def dashboard(request: Request) -> Response:
        def read() -> dict[str, Any]:
            with console.sessions() as session:
                return views.dashboard(settings, session, utcnow())

        return console.page(request, "dashboard.html", **await run_in_threadpool(read))

    async def findings(request: Request) -> Response:
        f = views.Filters.parse(request.query_params)

        def read() -> dict[str, Any]:
            with console.sessions() as session:
                return views.findings_page(settings, session, f, utcnow())

        return console.page(request, "findings.html", f=f, checks=views.CHECK_IDS,
                            severities=views.SEVERITIES, states=views.STATES,
                            ages=list(views.AGES), **await run_in_threadpool(read))

    async def family(request: Request) -> Response:
        pid = request.path_params["patient_id"]

        def read() -> dict[str, Any]:
            facts, why = views.read_facts(settings, pid)
            contacts = [c["contact_id"] for c in facts["contacts"]] if facts else []
            with console.sessions() as session:
                data = views.family(settings, session, pid, utcnow(), contacts)
            return {"facts": facts, "facts_error": why, **data}

        task = request.query_params.get("task", "")
        task = task if _is_uuid(task) else ""
        tomorrow = (utcnow().astimezone(console.tz) + timedelta(days=7)).date().isoformat()
        return console.page(request, "family.html", patient_id=pid, task=task,
                            default_until=tomorrow, **await run_in_threadpool(read))

    async def contact(request: Request) -> Response:
        """A finding that names only a contact: its family when it has one chart, else
        the charts to choose from and the contact's findings."""
        cid = request.path_params["contact_id"]
        charts, why = await run_in_threadpool(views.read_contact_charts, settings, cid)
        if charts is not None and len(charts) == 1:
            return RedirectResponse(f"/families/{quote(charts[0], safe='')}", status_code=303)

        def read() -> list[dict[str, Any]]:
            with console.sessions() as session:
                return views.contact_findings(settings, session, cid, utcnow())

        return console.page(request, "contact.html", contact_id=cid, charts=charts,
                            charts_error=why, findings=await run_in_threadpool(read))

    async def batch(request: Request) -> Response:
        from worker.fixes.staging import staged_fixes

        run_id = int(request.path_params["run_id"])

        def read() -> list[dict[str, Any]]:
            with console.sessions() as session:
                return staged_fixes(session, settings.practice, run_id)

        return console.page(request, "batch.html", run_id=run_id,
                            fixes=await run_in_threadpool(read))

    async def adhoc_progress(request: Request) -> Response:
        from worker.runtime.adhoc import poll

        task = request.path_params["task_id"]
        if not _is_uuid(task):
            return JSONResponse({"error": "not a task id"}, status_code=404)
        p = await run_in_threadpool(poll, console.sessions, settings, task)
        body: dict[str, Any] = {"state": p.state, "text": _progress_text(p)}
        if p.run is not None:
            body["run"] = {"id": p.run.id, "status": p.run.status,
                           "findings": p.run.findings_total, "new": p.run.findings_new,
                           "resolved": p.run.findings_resolved,
                           "fixes": p.run.fixes_queued, "alerts": p.run.alerts}
        return JSONResponse(body)

    # -- operator actions --------------------------------------------------------------

    def act(request: Request, fn: Callable[[Session], str], back: str) -> Response:
        """Run one action in one transaction; its message (or refusal) is the flash."""
        try:
            with console.sessions.begin() as session:
                message = fn(session)
        except (OperationRefused, auth.UserError) as err:
            message = f"Not done: {err}"
        request.state.session.flash = message
        return RedirectResponse(back, status_code=303)

    async def silence(request: Request) -> Response:
        from worker.runtime import operations as ops

        form = await form_for(request)
        if isinstance(form, Response):
            return form
        fp = request.path_params["fingerprint"]
        reason = form.get("reason", "").strip()
        back = back_to(form.get("back"), "/findings")
        user: StaffUser = request.state.user
        try:
            day = datetime.strptime(form.get("until", ""), "%Y-%m-%d").date()
            until = datetime.combine(day, time(0, 0), console.tz)
        except ValueError:
            request.state.session.flash = "Not done: choose the date the silence ends."
            return RedirectResponse(back, status_code=303)

        def do(session: Session) -> str:
            row = ops.silence(session, settings.practice, fp, until, reason,
                              user.username, utcnow())
            console.audit(session, request, "silence", patient_id=row.patient_id,
                          target=f"finding {fp}", reason=reason,
                          outcome=f"silenced until {views.local(until, console.tz)}")
            return f"Silenced {row.check} until {views.local(until, console.tz)}."

        return await run_in_threadpool(act, request, do, back)

    async def unsilence(request: Request) -> Response:
        from worker.runtime import operations as ops

        form = await form_for(request)
        if isinstance(form, Response):
            return form
        fp = request.path_params["fingerprint"]
        reason = form.get("reason", "").strip() or None
        back = back_to(form.get("back"), "/findings")
        user: StaffUser = request.state.user

        def do(session: Session) -> str:
            row = ops.find_row(session, settings.practice, fp)
            done = ops.unsilence(session, row, utcnow(),
                                 f"unsilenced by {user.username} in the console"
                                 + (f": {reason}" if reason else ""))
            console.audit(session, request, "unsilence", patient_id=row.patient_id,
                          target=f"finding {fp}", reason=reason,
                          outcome="open again" if done else f"was not silenced ({row.state})")
            return f"Unsilenced {row.check}: open again." if done else \
                f"{row.check} was not silenced."

        return await run_in_threadpool(act, request, do, back)

    async def decide_batch(request: Request) -> Response:
        from worker.fixes.staging import release_staged, staged_fixes
        from worker.runtime.dispatch import send_fixes

        if request.path_params["decision"] not in ("approve", "reject"):
            return PlainTextResponse("Not Found", status_code=404)
        form = await form_for(request)
        if isinstance(form, Response):
            return form
        run_id = int(request.path_params["run_id"])
        approve = request.path_params["decision"] == "approve"
        reason = form.get("reason", "").strip() or None
        user: StaffUser = request.state.user

        def do() -> str:
            with console.sessions() as session:
                patients = sorted({f["patient_id"] for f in staged_fixes(
                    session, settings.practice, run_id) if f["patient_id"]})
            said: list[str] = []
            try:
                count = release_staged(settings, run_id, approve, by=user.username,
                                       mode="auto", sessions=console.sessions,
                                       echo=said.append, enqueue=send_fixes)
            except (RuntimeError, SettingsError, SourceError) as err:
                # No broker and no writable portal here: the decision stands (committed
                # first); released fixes wait as intents for the worker's resume task.
                log.warning("console_batch_not_applied", run_id=run_id,
                            error=type(err).__name__)
                count = 0
                said.append(f"run {run_id}: decided, but not applied here "
                            f"({type(err).__name__}); the worker picks the fixes up")
            verb = "approve batch" if approve else "reject batch"
            done = "released" if approve else "rejected"
            with console.sessions.begin() as session:
                console.audit(session, request, verb, target=f"run {run_id}", reason=reason,
                              outcome=" ".join(said))
                for pid in patients:
                    console.audit(session, request, verb, patient_id=pid,
                                  target=f"run {run_id}", reason=reason,
                                  outcome=f"{count} fix(es) {done}")
            return " ".join(said)

        request.state.session.flash = await run_in_threadpool(do)
        return RedirectResponse("/", status_code=303)

    async def pause(request: Request) -> Response:
        from worker.runtime import operations as ops

        if request.path_params["switch"] not in ("pause", "resume"):
            return PlainTextResponse("Not Found", status_code=404)
        form = await form_for(request)
        if isinstance(form, Response):
            return form
        paused = request.path_params["switch"] == "pause"
        reason = form.get("reason", "").strip()
        if paused and not reason:
            request.state.session.flash = "Not done: say why fixes are paused."
            return RedirectResponse("/", status_code=303)

        def do(session: Session) -> str:
            ops.set_paused(session, settings.practice, paused,
                           reason or "resumed in the console", utcnow())
            console.audit(session, request, "pause fixes" if paused else "resume fixes",
                          reason=reason or None)
            return "Fixes paused: detection and digests go on." if paused else "Fixes resumed."

        return await run_in_threadpool(act, request, do, "/")

    async def reconcile(request: Request) -> Response:
        from worker.runtime.adhoc import BrokerUnreachable, send
        from worker.scan.engine import ScopeRequest

        form = await form_for(request)
        if isinstance(form, Response):
            return form
        pid = request.path_params["patient_id"]
        task_id = str(uuid.uuid4())
        try:
            await run_in_threadpool(send, settings, ScopeRequest("patient", pid), task_id,
                                    float(settings.scan_hard_limit_seconds + 300))
            outcome, back = f"queued as task {task_id}", f"/families/{pid}?task={task_id}"
        except BrokerUnreachable as err:
            outcome, back = f"not queued: {err}", f"/families/{pid}"

        def do(session: Session) -> str:
            console.audit(session, request, "reconcile", patient_id=pid,
                          target=f"patient {pid}", outcome=outcome)
            return f"Ad hoc reconcile {outcome}."

        return await run_in_threadpool(act, request, do, back)

    routes = [
        Route("/healthz", healthz),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_post, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", dashboard),
        Route("/findings", findings),
        Route("/families/{patient_id:str}", family),
        Route("/families/{patient_id:str}/reconcile", reconcile, methods=["POST"]),
        Route("/contacts/{contact_id:str}", contact),
        Route("/batches/{run_id:int}", batch),
        Route("/batches/{run_id:int}/{decision:str}", decide_batch, methods=["POST"]),
        Route("/findings/{fingerprint:str}/silence", silence, methods=["POST"]),
        Route("/findings/{fingerprint:str}/unsilence", unsilence, methods=["POST"]),
        Route("/fixes/{switch:str}", pause, methods=["POST"]),
        Route("/adhoc/{task_id:str}", adhoc_progress),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard)])
    app.state.console = console
    return app


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _progress_text(p: Any) -> str:
    if p.state == "queued":
        return "queued: waiting for a worker to pick it up"
    if p.state == "waiting":
        return "waiting for the scan lock held by another scan"
    if p.state == "started":
        return "started: reading OP and the portal"
    if p.state == "running":
        return f"running (run {p.run.id if p.run else '?'})"
    if p.state == "done" and p.run is not None:
        r = p.run
        return (f"done: run {r.id} · {r.findings_total} finding(s) ({r.findings_new} new, "
                f"{r.findings_resolved} resolved) · {r.fixes_queued} fix(es) queued · "
                f"{r.alerts} alert(s)")
    if p.state == "failed":
        return "failed: see oprecon status"
    if p.state == "skipped":
        return "could not start: another scan held the lock; try again"
    return p.state
