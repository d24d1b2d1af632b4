"""Liveness without `celery inspect ping` (CELERY.md §5): heartbeats and the dead-man's switch.

Every `heartbeat_interval_seconds` each long-running process writes

- a local file in `heartbeat_dir` (`worker.heartbeat`, `beat.heartbeat`): the docker
  healthcheck `oprecon health --process worker|beat` reads only that, so it stays cheap
  and works while Redis is down;
- a Redis key `oprecon:<practice>:heartbeat:<process>:<id>` whose TTL is the stale age:
  `oprecon health` sees every worker and beat of the practice from anywhere.

A heartbeat older than three intervals is stale. The worker's is written by a bootstep
timer on the consumer's event loop, so a wedged main loop goes stale; beat's by a thread
that stops writing once the scheduler loop stops ticking (a standby beat waiting for the
RedBeat lock keeps writing, as `standby`). The worker writes `worker.ready` when it starts
consuming.

Heartbeats say the processes run, not that scans succeed. The dead-man's switch does:
no successful scan (full, incremental or on-call `--all`) for more than two incremental
intervals is unhealthy, and the `oprecon.health.deadman` task records a staff alert in kv
"deadman" (shape in docs/operations.md). Nothing here logs or stores anything but ids,
hosts and times.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
import structlog
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from worker.state.db import kv_get, kv_set

log = structlog.get_logger(__name__)

PROCESSES = ("worker", "beat")
STALE_FACTOR = 3
READY_FILE = "worker.ready"


def utcnow() -> datetime:
    return datetime.now(UTC)


def stale_after(settings: Settings) -> float:
    """Seconds after which a heartbeat is stale: three missed intervals, not one slow one."""
    return STALE_FACTOR * settings.heartbeat_interval_seconds


def heartbeat_file(settings: Settings, process: str) -> Path:
    return Path(settings.heartbeat_dir) / f"{process}.heartbeat"


def ready_file(settings: Settings) -> Path:
    return Path(settings.heartbeat_dir) / READY_FILE


def key_prefix(settings: Settings) -> str:
    return f"oprecon:{settings.practice}:heartbeat:"


def heartbeat_key(settings: Settings, process: str, ident: str) -> str:
    return f"{key_prefix(settings)}{process}:{ident}"


def beat_ident() -> str:
    """Beat has no node name; host and pid tell two beats on one host apart."""
    return f"{socket.gethostname()}:{os.getpid()}"


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def age_seconds(at: datetime, now: datetime) -> float:
    """Age, never negative: a clock a little ahead of ours is fresh, not from the future."""
    return max(0.0, (now - at).total_seconds())


def read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write then rename, so a healthcheck never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def redis_for_health(url: str) -> redis.Redis:
    """Short timeouts: a heartbeat or a health probe must not hang on a dead Redis."""
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


class Heartbeat:
    """One process's heartbeat: a local file and a Redis key with a TTL.

    `beat()` never raises: a full disk or a Redis outage is logged once when it starts
    and once when it ends, and shows up as a stale heartbeat, which is the point.
    """

    def __init__(
        self, settings: Settings, process: str, ident: str, *, client: redis.Redis | None = None
    ) -> None:
        if process not in PROCESSES:
            raise ValueError(f"unknown process {process!r}")
        self.settings = settings
        self.process = process
        self.ident = ident
        self.ready = False
        self._client = client
        self._failing: set[str] = set()
        self._lock = threading.Lock()

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis_for_health(self.settings.redis_url)
        return self._client

    @property
    def key(self) -> str:
        return heartbeat_key(self.settings, self.process, self.ident)

    def _trouble(self, what: str, err: Exception | None) -> None:
        if err is not None and what not in self._failing:
            self._failing.add(what)
            log.warning("heartbeat_write_failed", target=what, process=self.process,
                        error=type(err).__name__)
        elif err is None and what in self._failing:
            self._failing.discard(what)
            log.info("heartbeat_write_recovered", target=what, process=self.process)

    def beat(self, **extra: Any) -> None:
        now = utcnow()
        data = {"at": now.isoformat(), "process": self.process, "id": self.ident,
                "pid": os.getpid(), "ready": self.ready, **extra}
        with self._lock:
            try:
                _write_atomic(heartbeat_file(self.settings, self.process), data)
                self._trouble("file", None)
            except OSError as err:
                self._trouble("file", err)
            try:
                ttl = math.ceil(stale_after(self.settings))
                self.client.set(self.key, json.dumps(data), ex=ttl)
                self._trouble("redis", None)
            except redis.RedisError as err:
                self._trouble("redis", err)

    def mark_ready(self) -> None:
        """The worker consumes: write the readiness file and say so in the heartbeat."""
        self.ready = True
        try:
            _write_atomic(ready_file(self.settings),
                          {"at": utcnow().isoformat(), "id": self.ident, "pid": os.getpid()})
        except OSError as err:
            self._trouble("file", err)
        self.beat()

    def stop(self) -> None:
        """A clean shutdown is not a death: drop readiness and the Redis key at once."""
        self.ready = False
        if self.process == "worker":
            ready_file(self.settings).unlink(missing_ok=True)
        with contextlib.suppress(redis.RedisError):  # the TTL removes it anyway
            self.client.delete(self.key)


class Ticker(threading.Thread):
    """Calls `fn` now and then every `interval` seconds until stopped (a daemon thread)."""

    def __init__(self, interval: float, fn: Callable[[], None], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self.fn = fn
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.fn()
            except Exception:  # a heartbeat bug must not kill the thread silently
                log.exception("heartbeat_tick_failed", thread=self.name)
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=self.interval + 1)


def beat_loop_alive(
    active: bool, last_progress: float | None, now_mono: float, max_loop_interval: float,
    interval: float,
) -> bool:
    """Should beat stamp its heartbeat? A standby always (alive, waiting for the lock); the
    active beat only while its loop ticks: it sleeps at most `max_loop_interval` between
    ticks, so no progress for twice that plus one heartbeat interval means it is stuck."""
    if not active or last_progress is None:
        return True
    return now_mono - last_progress <= 2 * max_loop_interval + interval


class BeatHeartbeat:
    """Beat's heartbeat thread. `state()` returns (holds the scheduler lock, monotonic
    time of the last finished tick or None)."""

    def __init__(
        self, settings: Settings, state: Callable[[], tuple[bool, float | None]],
        max_loop_interval: float,
    ) -> None:
        self.heartbeat = Heartbeat(settings, "beat", beat_ident())
        self._state = state
        self._max_loop = max_loop_interval
        self._interval = settings.heartbeat_interval_seconds
        self._active_since: float | None = None
        self._stalled = False
        self._thread = Ticker(self._interval, self._tick, "oprecon-beat-heartbeat")

    def start(self) -> None:
        self._thread.start()

    def _tick(self) -> None:
        active, last_tick = self._state()
        now_mono = time.monotonic()
        if active and self._active_since is None:
            self._active_since = now_mono
            log.info("beat_active", id=self.heartbeat.ident)
        known = [p for p in (last_tick, self._active_since) if p is not None]
        progress = max(known) if known else None
        if beat_loop_alive(active, progress, now_mono, self._max_loop, self._interval):
            if self._stalled:
                log.info("beat_loop_ticking_again", id=self.heartbeat.ident)
            self._stalled = False
            self.heartbeat.beat(role="active" if active else "standby")
        elif not self._stalled:
            self._stalled = True
            log.error("beat_loop_stalled", id=self.heartbeat.ident,
                      seconds_since_tick=round(now_mono - (progress or now_mono), 1))

    def stop(self) -> None:
        self._thread.stop()
        self.heartbeat.stop()


# -- checks --------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, **self.data}


def fmt_seconds(seconds: float) -> str:
    """Short, for people: 45s, 3m12s, 2h05m, 3d04h."""
    s = int(round(abs(seconds)))
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def process_check(settings: Settings, process: str, now: datetime | None = None) -> Check:
    """The docker healthcheck: only this container's heartbeat file (and readiness)."""
    now = now or utcnow()
    path = heartbeat_file(settings, process)
    stamp = read_stamp(path)
    at = parse_time(stamp.get("at")) if stamp else None
    limit = stale_after(settings)
    if at is None:
        return Check(process, False, f"no heartbeat in {path}", {"limit_seconds": limit})
    age = age_seconds(at, now)
    data: dict[str, Any] = {"age_seconds": round(age, 3), "limit_seconds": limit,
                            "role": stamp.get("role") if stamp else None}
    if age > limit:
        stale = f"heartbeat is {fmt_seconds(age)} old (stale after {fmt_seconds(limit)})"
        return Check(process, False, stale, data)
    if process == "worker" and not ready_file(settings).exists():
        return Check(process, False, "alive but not ready (not consuming yet)", data)
    role = f", {stamp['role']}" if stamp and stamp.get("role") else ""
    return Check(process, True, f"heartbeat {fmt_seconds(age)} ago{role}", data)


def deadman_limit(settings: Settings) -> timedelta:
    return timedelta(minutes=2 * settings.incremental_scan_minutes)


def is_overdue(since: datetime, now: datetime, limit: timedelta) -> bool:
    """Strictly older than the limit: a success exactly two intervals ago still counts."""
    return now - since > limit


def deadman_baseline(
    last_success: dict[str, Any] | None, deadman: dict[str, Any] | None
) -> datetime | None:
    """The last successful scan; before the first one ever, when the switch was armed."""
    at = parse_time((last_success or {}).get("at"))
    return at or parse_time((deadman or {}).get("armed_at"))


def deadman_check(
    settings: Settings, last_success: dict[str, Any] | None, deadman: dict[str, Any] | None,
    now: datetime,
) -> Check:
    limit = deadman_limit(settings)
    limit_s = limit.total_seconds()
    since = deadman_baseline(last_success, deadman)
    if since is None:
        # A fresh deployment: the switch arms at the deadman task's first check and only
        # then starts counting, so a deployment is not unhealthy before its first scan.
        return Check("last scan", True, "no scan has finished yet: the dead-man's switch "
                     f"arms at its first check and allows {fmt_seconds(limit_s)}",
                     {"limit_seconds": limit_s, "grace": True})
    age = age_seconds(since, now)
    data = {"age_seconds": round(age, 3), "limit_seconds": limit_s,
            "last_success": last_success}
    if deadman is None and last_success is not None and last_success.get("kind") == "demo":
        # `oprecon demo` scans its own database three times and stops; no worker or beat
        # ever watches it, so "overdue" would only alarm a newcomer exploring the demo.
        return Check("last scan", True, f"last successful demo run (run "
                     f"{last_success.get('run_id')}) {fmt_seconds(age)} ago; the dead-man's "
                     "switch is not armed: only `oprecon demo` has scanned this database",
                     {**data, "demo": True})
    if last_success is None:
        what = f"no successful scan since the switch was armed {fmt_seconds(age)} ago"
        if not is_overdue(since, now, limit):
            what = f"waiting for the first scan (switch armed {fmt_seconds(age)} ago)"
    else:
        what = (f"last successful {last_success.get('kind', 'scan')} scan "
                f"(run {last_success.get('run_id')}) {fmt_seconds(age)} ago")
    ok = not is_overdue(since, now, limit)
    limit_text = fmt_seconds(limit_s)
    suffix = f" (limit {limit_text})" if ok else f": over the {limit_text} limit"
    return Check("last scan", ok, what + suffix, data)


def run_deadman(
    settings: Settings, sessions: sessionmaker[Session], now: datetime | None = None
) -> dict[str, Any]:
    """The `oprecon.health.deadman` task: record (durably, in kv "deadman") whether scans
    are overdue. A new overdue episode gets `alerted: false`; whoever notifies staff sets
    it true, and a continuing episode keeps that, so staff are told once per outage."""
    now = now or utcnow()
    practice = settings.practice
    limit = deadman_limit(settings)
    with sessions.begin() as session:
        last = kv_get(session, practice, "last_success")
        prev = kv_get(session, practice, "deadman") or {}
        armed_at = prev.get("armed_at") or now.isoformat()
        since = deadman_baseline(last, {"armed_at": armed_at}) or now
        age = age_seconds(since, now)
        overdue = is_overdue(since, now, limit)
        value: dict[str, Any] = {
            "overdue": overdue,
            "age_seconds": round(age, 3),
            "limit_seconds": limit.total_seconds(),
            "last_success_at": (last or {}).get("at"),
            "last_success_run_id": (last or {}).get("run_id"),
            "checked_at": now.isoformat(),
            "armed_at": armed_at,
        }
        if overdue:
            continuing = bool(prev.get("overdue"))
            value["at"] = prev.get("at") if continuing else now.isoformat()
            value["alerted"] = bool(prev.get("alerted")) if continuing else False
            value["recovered_at"] = None
        else:
            value["at"] = None
            value["alerted"] = False
            recovering = bool(prev.get("overdue"))
            value["recovered_at"] = now.isoformat() if recovering else prev.get(
                "recovered_at")
            # For the all-clear (worker.digest): the outage that ended, and whether staff
            # were told of it (no all-clear for an outage nobody heard about).
            value["recovered_from"] = (
                (prev.get("last_success_at") or prev.get("armed_at")) if recovering
                else prev.get("recovered_from"))
            value["recovered_alerted"] = (bool(prev.get("alerted")) if recovering
                                          else bool(prev.get("recovered_alerted")))
        kv_set(session, practice, "deadman", value, now)
    if overdue:
        log.error("deadman_overdue", age_seconds=value["age_seconds"],
                  limit_seconds=value["limit_seconds"],
                  last_success_run_id=value["last_success_run_id"])
    elif prev.get("overdue"):
        log.info("deadman_recovered", age_seconds=value["age_seconds"])
    return value


LOST_CAUSE = "still marked running past the scan's hard time limit: its worker died"


def alive_key(settings: Settings, task_id: str) -> str:
    """The lease of a running scan task (worker.runtime.lost)."""
    return f"oprecon:{settings.practice}:scan-alive:{task_id}"


def lost_cause(settings: Settings) -> str:
    return (f"its worker stopped heart-beating (no sign of life for over "
            f"{fmt_seconds(stale_after(settings))}): killed or crashed")


def lease_expired(run: Any, now: datetime, settings: Settings, client: Any) -> bool:
    """A `running` run of a task whose lease is gone, and old enough to have had one."""
    if run.status != "running" or not run.task_id:
        return False
    if now - run.started_at <= timedelta(seconds=stale_after(settings)):
        return False
    return not client.exists(alive_key(settings, run.task_id))


def run_status(run: Any, now: datetime, settings: Settings, client: Any = None) -> str:
    """A run's status as on-call should read it: `running` past the hard time limit (and
    the lock's expiry), or with its lease expired (given a Redis client), is a dead run,
    whatever the row still says until the verify tick marks it."""
    if run.status == "running" and now - run.started_at > timedelta(
            seconds=settings.scan_hard_limit_seconds + 60):
        return "lost"
    if client is not None:
        with contextlib.suppress(redis.RedisError):
            if lease_expired(run, now, settings, client):
                return "lost"
    return str(run.status)


def run_cause(run: Any, status: str, settings: Settings) -> str | None:
    """A failed or lost run's cause for people: emails, phones and dates masked again
    (rows written before causes were scrubbed where recorded may quote a value)."""
    if run.error:
        from worker.model.text import scrub_text

        return scrub_text(str(run.error))
    if status != "lost":
        return None
    return LOST_CAUSE if run.status != "running" or not run.task_id else lost_cause(settings)


def recent_failures(
    session: Session, settings: Settings, now: datetime, limit: int = 20, client: Any = None,
) -> list[dict[str, Any]]:
    """Failed and lost runs since the last successful run, newest first, with cause."""
    from sqlalchemy import select

    from worker.state.models import Run

    rows = session.scalars(
        select(Run).where(Run.practice == settings.practice, Run.dry_run.is_(False))
        .order_by(Run.started_at.desc(), Run.id.desc()).limit(limit))
    out: list[dict[str, Any]] = []
    for run in rows:
        status = run_status(run, now, settings, client)
        if status == "succeeded":
            break
        if status in ("failed", "lost"):
            out.append({
                "run_id": run.id, "kind": run.kind, "status": status,
                "part": (run.summary or {}).get("part"),
                "cause": run_cause(run, status, settings) or "no cause recorded",
                "ago": fmt_seconds(age_seconds(run.started_at, now)),
            })
    return out


def failure_text(f: dict[str, Any]) -> str:
    return f"run {f['run_id']} ({f['kind']}) {f['status']} {f['ago']} ago: {f['cause']}"


def source_checks(settings: Settings, failures: list[dict[str, Any]]) -> list[Check]:
    """Does each source answer now (OP folder or database, portal API or folder)? With
    the cause of the last scan that failed on it since the last success."""
    checks = []
    for name, probe in (("op source", _probe_op), ("portal", _probe_portal)):
        try:
            ok, detail = probe(settings)
        except Exception as err:  # noqa: BLE001 — a probe reports, never raises
            ok, detail = False, f"{type(err).__name__}: {err}".splitlines()[0][:300]
        last = next((f for f in failures if f.get("part") == name), None)
        if last is not None:
            detail += f" · last error: {failure_text(last)}"
        checks.append(Check(name, ok, detail, {"last_failure": last}))
    return checks


def _probe_dir(directory: Any, names: tuple[str, ...], what: str) -> tuple[bool, str]:
    if directory is None:
        return False, f"no {what} export folder configured"
    path = Path(directory)
    if not path.is_dir():
        return False, f"{what} export folder {path} does not exist"
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        return False, f"{what} export folder {path} has no {', '.join(missing)}"
    return True, f"{what} export folder {path} has its {len(names)} files"


def _probe_sql(url: str, table: str, what: str) -> tuple[bool, str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    parsed = make_url(url)
    args = {"connect_timeout": 3} if parsed.get_backend_name() == "postgresql" else {}
    engine = create_engine(parsed, connect_args=args)
    try:
        with engine.connect() as conn:
            conn.execute(text(f"SELECT 1 FROM {table} LIMIT 1"))
        return True, f"{what} database answers ({mask_url(url)})"
    except SQLAlchemyError as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        return False, f"{what} database ({mask_url(url)}): {type(err).__name__}: {first}"
    finally:
        engine.dispose()


def _probe_op(settings: Settings) -> tuple[bool, str]:
    if settings.op_source == "csv":
        return _probe_dir(settings.op_dir, ("patients.csv", "contacts.csv",
                                            "family_contacts.csv"), "OP")
    if not settings.op_db_url:
        return False, "no OP database configured (OPRECON_OP_DB_URL)"
    return _probe_sql(settings.op_db_url, "patients", "OP")


def _probe_portal(settings: Settings) -> tuple[bool, str]:
    if settings.portal_adapter:
        return True, f"custom adapter {settings.portal_adapter} (not probed)"
    if settings.portal_source == "http":
        import httpx

        if not settings.portal_url:
            return False, "no portal URL configured (OPRECON_PORTAL_URL)"
        token = settings.portal_token.get_secret_value() if settings.portal_token else None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        url = settings.portal_url.rstrip("/") + "/users"
        started = time.perf_counter()
        try:
            answer = httpx.get(url, params={"limit": 1}, headers=headers,
                               timeout=min(5.0, settings.portal_timeout_seconds))
        except httpx.HTTPError as err:
            return False, f"portal API {mask_url(settings.portal_url)}: no answer " \
                          f"({type(err).__name__})"
        took = time.perf_counter() - started
        if answer.status_code != 200:
            return False, (f"portal API {mask_url(settings.portal_url)}: HTTP "
                           f"{answer.status_code} in {took:.2f}s")
        return True, f"portal API answers ({mask_url(settings.portal_url)}, {took:.2f}s)"
    return _probe_dir(settings.portal_dir, ("portal_users.csv", "portal_links.csv",
                                            "portal_sources.csv", "portal_audit.csv"), "portal")


def read_heartbeats(client: redis.Redis, settings: Settings) -> list[dict[str, Any]]:
    out = []
    for key in client.scan_iter(match=f"{key_prefix(settings)}*", count=100):
        raw: Any = client.get(key)
        if raw is None:
            continue
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        if isinstance(data, dict):
            out.append(data)
    return out


def heartbeat_checks(
    settings: Settings, beats: list[dict[str, Any]], now: datetime
) -> list[Check]:
    """Worker: at least one fresh and ready. Beat: exactly one fresh active (a second
    active beat would double the schedule); standbys are listed."""
    limit = stale_after(settings)

    def fresh(b: dict[str, Any]) -> bool:
        at = parse_time(b.get("at"))
        return at is not None and age_seconds(at, now) <= limit

    def age(b: dict[str, Any]) -> str:
        at = parse_time(b.get("at"))
        return fmt_seconds(age_seconds(at, now)) if at else "?"

    workers = sorted((b for b in beats if b.get("process") == "worker" and fresh(b)),
                     key=lambda b: str(b.get("id")))
    ready = [w for w in workers if w.get("ready")]
    wdetail = ", ".join(
        f"{w.get('id')} ({'ready' if w.get('ready') else 'starting'}, {age(w)} ago)"
        for w in workers
    ) or "no live worker heartbeat"
    checks = [Check("worker", bool(ready), f"{len(ready)} ready: {wdetail}" if workers
                    else wdetail,
                    {"alive": len(workers), "ready": len(ready),
                     "ids": [w.get("id") for w in workers]})]

    beaters = sorted((b for b in beats if b.get("process") == "beat" and fresh(b)),
                     key=lambda b: str(b.get("id")))
    active = [b for b in beaters if b.get("role") == "active"]
    standby = [b for b in beaters if b.get("role") != "active"]
    parts = [f"{b.get('id')} active ({age(b)} ago)" for b in active]
    parts += [f"{b.get('id')} standby" for b in standby]
    if not active:
        detail = "no active beat" + (f"; {len(standby)} standby" if standby else "")
    elif len(active) > 1:
        detail = f"{len(active)} active beats: the schedule may run twice"
    else:
        detail = ", ".join(parts)
    checks.append(Check("beat", len(active) == 1, detail,
                        {"active": len(active), "standby": len(standby),
                         "ids": [b.get("id") for b in beaters]}))
    return checks


def cluster_checks(settings: Settings, now: datetime | None = None) -> list[Check]:
    """`oprecon health`: Redis, broker and state DB reachable, worker and beat alive, and
    the dead-man's switch. Reads only; never migrates or writes."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    now = now or utcnow()
    checks: list[Check] = []
    beats: list[dict[str, Any]] | None = None
    client = redis_for_health(settings.redis_url)
    try:
        client.ping()
        beats = read_heartbeats(client, settings)
        checks.append(Check("redis", True, f"reachable ({mask_url(settings.redis_url)})"))
    except redis.RedisError as err:
        checks.append(Check("redis", False, f"unreachable ({mask_url(settings.redis_url)}): "
                                            f"{type(err).__name__}"))
    if settings.broker_url.startswith(("redis://", "rediss://")):
        broker = redis_for_health(settings.broker_url)
        try:
            broker.ping()
            checks.append(Check("broker", True, f"reachable ({mask_url(settings.broker_url)})"))
        except redis.RedisError as err:
            checks.append(Check("broker", False, f"unreachable ({mask_url(settings.broker_url)})"
                                                 f": {type(err).__name__}"))
        finally:
            broker.close()

    last: dict[str, Any] | None = None
    deadman: dict[str, Any] | None = None
    failures: list[dict[str, Any]] = []
    paused: dict[str, Any] = {}
    breaker: dict[str, Any] = {}
    db_ok = False
    url = make_url(settings.state_db_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not Path(url.database).exists():
        checks.append(Check("state db", False, f"no database at {url.database}"))
    else:
        args = {"connect_timeout": 3} if url.get_backend_name() == "postgresql" else {}
        engine = create_engine(url, connect_args=args)
        try:
            with Session(engine) as session:
                last = kv_get(session, settings.practice, "last_success")
                deadman = kv_get(session, settings.practice, "deadman")
                failures = recent_failures(session, settings, now,
                                           client=client if beats is not None else None)
                paused = kv_get(session, settings.practice, "paused") or {}
                breaker = kv_get(session, settings.practice, "breaker") or {}
            db_ok = True
            checks.append(Check("state db", True, f"reachable ({mask_url(settings.state_db_url)})"))
        except SQLAlchemyError as err:
            checks.append(Check("state db", False,
                                f"unreachable or not migrated ({mask_url(settings.state_db_url)})"
                                f": {type(err).__name__}"))
        finally:
            engine.dispose()

    if beats is not None:
        checks.extend(heartbeat_checks(settings, beats, now))
    else:
        checks.append(Check("worker", False, "unknown: Redis unreachable"))
        checks.append(Check("beat", False, "unknown: Redis unreachable"))
    client.close()
    checks.extend(source_checks(settings, failures))
    if db_ok:
        checks.append(fixes_check(paused, breaker))
        check = deadman_check(settings, last, deadman, now)
        if failures:
            # The newest scan failed: say which part and why, and do not call it healthy.
            check.ok = False
            check.detail += f" · last attempt failed: {failure_text(failures[0])}"
            check.data["failures"] = failures
        checks.append(check)
    else:
        checks.append(Check("last scan", False, "unknown: state database unreachable"))
    return checks


def fixes_check(paused: dict[str, Any], breaker: dict[str, Any]) -> Check:
    """Fixes stopped by on-call (pause) or by the portal breaker: not healthy, because
    nothing is being repaired, even though everything runs."""
    problems = []
    if paused.get("paused"):
        problems.append(f"PAUSED since {paused.get('at', '?')}: {paused.get('reason', '')} "
                        "(oprecon resume)")
    if breaker.get("state") == "open":
        problems.append("portal breaker open: too many portal errors, fixes wait "
                        "(it probes and closes by itself)")
    if problems:
        return Check("fixes", False, "; ".join(problems),
                     {"paused": bool(paused.get("paused")), "breaker": breaker.get("state")})
    return Check("fixes", True, "running (not paused, portal breaker closed)",
                 {"paused": False, "breaker": breaker.get("state", "closed")})


def mask_url(url: str) -> str:
    """A URL with its password replaced by ***, for output that people paste into tickets."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))
