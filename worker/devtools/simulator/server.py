"""A real HTTP server for `worker/sources/openapi/portal.yaml`, over a `Simulator`.

Real sockets, because the client's retry rules (timeouts, dropped connections, 429 with
Retry-After, 5xx, broken JSON) are only worth testing against real failures. Faults are
armed per request count through `POST /_sim/faults`; `/_sim/*` also sets the clock and
reports how often each write was applied, so a test can prove "exactly once".

The server speaks HTTP/1.0 (one request per connection): no idle keep-alive handler
threads, so `shutdown()` returns promptly. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from worker.devtools.simulator.clock import SimClock
from worker.devtools.simulator.store import (
    DEFAULT_DELAY,
    DEFAULT_LIMIT,
    DEFAULT_REFRESH_DELAY,
    MAX_SELECT_IDS,
    BadRequest,
    Simulator,
    iso,
)
from worker.sources.parsing import parse_time

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
MAX_BODY = 1024 * 1024
MAX_KEY = 255
# A truncated JSON document: what a proxy cutting a response short looks like.
MALFORMED_BODY = b'{"items": [{"user_id": "u'
WRONG_SHAPE_BODY = b'{"items": {"unexpected": true}, "next_cursor": 7}'

Reply = tuple[int, Any, dict[str, str]]


# -- faults -------------------------------------------------------------------------------


@dataclass
class _Rule:
    path: str | None
    latency_ms: int = 0
    latency_left: int = 0
    status: int | None = None
    status_left: int = 0
    retry_after: float | None = None
    applied: bool = False  # `status` answers a request that was processed first
    left: dict[str, int] = field(default_factory=dict)  # drop, malformed, wrong_shape, partial

    def matches(self, path: str) -> bool:
        return self.path is None or path.startswith(self.path)

    @property
    def spent(self) -> bool:
        return self.latency_left <= 0 and self.status_left <= 0 and not any(self.left.values())


@dataclass(frozen=True)
class Fault:
    """What to do to one request."""

    latency: float = 0.0
    outcome: str | None = None  # "drop", "status", "malformed", "wrong_shape", "partial"
    status: int | None = None
    retry_after: float | None = None
    applied: bool = False  # process the request, then answer `status` instead


_OUTCOMES = ("drop", "malformed", "wrong_shape", "partial")


class FaultPlan:
    """Faults for the next n matching requests, then nothing: retries meet a healthy server.

    A spec is `{"latency_ms": ms, "status": 429|500|503|..., "count": n, "retry_after": s,
    "applied": bool, "drop": n, "malformed": n, "wrong_shape": n, "partial": n,
    "path": "/users"}`; `count` (default 1) applies to `status` and `latency_ms`. With
    `applied` the request is processed (a write is accepted) before `status` answers it:
    a portal that fails after doing the work. Each request takes at most
    one outcome (drop, then status, malformed, wrong_shape, partial); `partial` (a short
    page with a valid cursor) only applies to paged reads. Admin requests are exempt.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []

    def add(self, spec: Mapping[str, Any]) -> None:
        def count(name: str, default: int = 0) -> int:
            value = spec.get(name, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BadRequest(f"{name} must be a non-negative integer")
            return value

        known = {"latency_ms", "status", "count", "retry_after", "path", "applied",
                 *_OUTCOMES}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise BadRequest(f"unknown fault field(s): {', '.join(unknown)}")
        n = count("count", 1)
        status = spec.get("status")
        if status is not None and (not isinstance(status, int) or not 100 <= status <= 599):
            raise BadRequest("status must be an HTTP status code")
        retry_after = spec.get("retry_after")
        if retry_after is not None and not isinstance(retry_after, int | float):
            raise BadRequest("retry_after must be a number of seconds")
        path = spec.get("path")
        if path is not None and not isinstance(path, str):
            raise BadRequest("path must be a string")
        applied = spec.get("applied", False)
        if not isinstance(applied, bool):
            raise BadRequest("applied must be true or false")
        if applied and status is None:
            raise BadRequest("applied needs a status to answer with")
        latency = count("latency_ms")
        rule = _Rule(
            path=path,
            latency_ms=latency,
            latency_left=n if latency else 0,
            status=status,
            status_left=n if status is not None else 0,
            retry_after=retry_after,
            applied=applied,
            left={name: count(name) for name in _OUTCOMES},
        )
        if not rule.spent:
            with self._lock:
                self._rules.append(rule)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"path": r.path, "latency_ms": r.latency_ms, "latency_left": r.latency_left,
                 "status": r.status, "status_left": r.status_left, "applied": r.applied,
                 **r.left}
                for r in self._rules
            ]

    def take(self, path: str, paged: bool) -> Fault:
        """Consume the faults that apply to this request."""
        latency = 0.0
        outcome: str | None = None
        status: int | None = None
        retry_after: float | None = None
        applied = False
        with self._lock:
            for rule in self._rules:
                if not rule.matches(path):
                    continue
                if not latency and rule.latency_left > 0:
                    rule.latency_left -= 1
                    latency = rule.latency_ms / 1000
                if outcome is None:
                    outcome = self._outcome(rule, paged)
                    if outcome == "status":
                        status, retry_after = rule.status, rule.retry_after
                        applied = rule.applied
            self._rules = [r for r in self._rules if not r.spent]
        return Fault(latency, outcome, status, retry_after, applied)

    @staticmethod
    def _outcome(rule: _Rule, paged: bool) -> str | None:
        if rule.left.get("drop", 0) > 0:
            rule.left["drop"] -= 1
            return "drop"
        if rule.status_left > 0:
            rule.status_left -= 1
            return "status"
        for name in ("malformed", "wrong_shape", "partial"):
            if rule.left.get(name, 0) > 0 and (paged or name != "partial"):
                rule.left[name] -= 1
                return name
        return None


# -- routing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Route:
    method: str
    template: str
    handler: str
    pattern: re.Pattern[str]


def _route(method: str, template: str, handler: str) -> _Route:
    regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
    return _Route(method, template, handler, re.compile(f"^{regex}$"))


ROUTES: tuple[_Route, ...] = (
    _route("GET", "/users", "list_users"),
    _route("GET", "/users/{user_id}", "get_user"),
    _route("PATCH", "/users/{user_id}", "patch_user"),
    _route("GET", "/users/{user_id}/caregivers", "caregivers"),
    _route("GET", "/users/{user_id}/dependents", "dependents"),
    _route("GET", "/links", "list_links"),
    _route("GET", "/sources", "list_sources"),
    _route("POST", "/users/{user_id}/source/disconnect", "source_disconnect"),
    _route("POST", "/users/{user_id}/source/connect", "source_connect"),
    _route("POST", "/users/{user_id}/source/refresh", "source_refresh"),
    _route("GET", "/audit", "list_audit"),
    _route("POST", "/welcome", "welcome"),
    # Simulator administration: not part of the portal contract.
    _route("GET", "/_sim/health", "sim_health"),
    _route("GET", "/_sim/clock", "sim_clock"),
    _route("POST", "/_sim/clock", "sim_set_clock"),
    _route("GET", "/_sim/faults", "sim_faults"),
    _route("POST", "/_sim/faults", "sim_add_faults"),
    _route("DELETE", "/_sim/faults", "sim_clear_faults"),
    _route("GET", "/_sim/calls", "sim_calls"),
    _route("GET", "/_sim/pending", "sim_pending"),
)
PAGED = frozenset({"list_users", "caregivers", "dependents", "list_links", "list_sources",
                   "list_audit"})
# Writes that must carry an Idempotency-Key (connect/disconnect take one optionally).
KEY_REQUIRED = frozenset({"patch_user", "source_refresh", "welcome"})


def _match(method: str, path: str) -> tuple[_Route | None, dict[str, str], bool]:
    """(route, path params, path known for another method)."""
    other = False
    for route in ROUTES:
        found = route.pattern.match(path)
        if found:
            if route.method == method:
                return route, {k: unquote(v) for k, v in found.groupdict().items()}, False
            other = True
    return None, {}, other


def _error(status: int, code: str, message: str) -> Reply:
    return status, {"error": code, "message": message}, {}


class _Handler(BaseHTTPRequestHandler):
    server: SimulatorServer
    server_version = "OPPortalSimulator/1.0"
    sys_version = ""
    timeout = 10  # a client that connects and says nothing cannot pin a thread

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("simulator: " + format, *args)

    # -- plumbing -----------------------------------------------------------------------

    def _dispatch(self) -> None:
        # The client may have given up (a timeout fault): there is nobody to answer.
        self.server.track(+1)
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._serve()
        finally:
            self.server.track(-1)

    def _serve(self) -> None:
        srv = self.server
        split = urlsplit(self.path)
        path = split.path.rstrip("/") or "/"
        query = parse_qs(split.query, keep_blank_values=True)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._send(*_error(400, "bad_request", "bad Content-Length"))
            return
        if length > MAX_BODY:
            self._send(*_error(413, "too_large", "request body too large"))
            return
        raw = self.rfile.read(length) if length else b""
        route, params, other = _match(self.command, path)
        srv.count(f"{self.command} {route.template}" if route else "unmatched")
        if route is None:
            if other:
                self._send(*_error(405, "method_not_allowed", "method not allowed"))
            else:
                self._send(*_error(404, "not_found", "no such resource"))
            return
        if route.handler != "sim_health" and not self._authorized():
            self._send(401, {"error": "unauthorized", "message": "bearer token required"},
                       {"WWW-Authenticate": 'Bearer realm="op-portal"'})
            return
        fault = Fault()
        if not route.template.startswith("/_sim/"):
            fault = srv.faults.take(path, paged=route.handler in PAGED)
        if fault.latency and srv.stopping.wait(fault.latency):
            return  # shutting down: drop it
        if fault.outcome == "drop":
            return  # close the connection without a response
        if fault.outcome == "status" and not fault.applied:
            status = fault.status or 500
            headers = {}
            if status == 429:
                wait = 1.0 if fault.retry_after is None else fault.retry_after
                headers["Retry-After"] = f"{wait:g}"
            self._send(status, {"error": "injected", "message": f"simulated HTTP {status}"},
                       headers)
            return
        if fault.outcome in ("malformed", "wrong_shape"):
            self._send(200, MALFORMED_BODY if fault.outcome == "malformed" else WRONG_SHAPE_BODY)
            return
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            self._send(*_error(400, "bad_json", "request body is not JSON"))
            return
        handler: Callable[..., Reply] = getattr(self, f"h_{route.handler}")
        try:
            reply = handler(params=params, query=query, body=body,
                            partial=fault.outcome == "partial")
        except BadRequest as err:
            reply = _error(400, "bad_request", str(err))
        except Exception:
            log.exception("simulator: %s %s failed", self.command, route.template)
            reply = _error(500, "internal", "internal error")
        if fault.outcome == "status":  # `applied`: the work is done, the answer is not
            status = fault.status or 500
            reply = (status, {"error": "injected",
                              "message": f"simulated HTTP {status} after processing"}, {})
        self._send(*reply)

    def _authorized(self) -> bool:
        token = self.server.token
        if not token:
            return True
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        )

    def _send(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def _one(query: Mapping[str, list[str]], name: str) -> str | None:
        values = query.get(name)
        return values[-1] if values else None

    def _paging(self, query: Mapping[str, list[str]]) -> tuple[str | None, int]:
        cursor = self._one(query, "cursor") or None
        raw = self._one(query, "limit")
        try:
            limit = int(raw) if raw else DEFAULT_LIMIT
        except ValueError:
            raise BadRequest("limit must be an integer") from None
        return cursor, limit

    def _time(self, query: Mapping[str, list[str]], name: str) -> datetime | None:
        raw = self._one(query, name)
        if not raw:
            return None
        for text in (raw, raw.replace(" ", "+")):  # an unencoded "+" arrives as a space
            try:
                return parse_time(text)
            except ValueError:
                continue
        raise BadRequest(f"{name} must be an ISO 8601 time")

    @staticmethod
    def _ids(query: Mapping[str, list[str]], *names: str) -> dict[str, list[str]]:
        """The repeatable id selectors present in the query, at most MAX_SELECT_IDS
        values in all; a blank one is refused rather than read as "no selector"."""
        found = {name: query[name] for name in names if name in query}
        if sum(len(values) for values in found.values()) > MAX_SELECT_IDS:
            raise BadRequest(f"at most {MAX_SELECT_IDS} ids per request")
        for name, values in found.items():
            if any(not value.strip() for value in values):
                raise BadRequest(f"{name} must not be blank")
        return found

    def _page(self, kind: str, query: Mapping[str, list[str]], partial: bool,
              **filters: Any) -> Reply:
        cursor, limit = self._paging(query)
        items, next_cursor = self.server.simulator.store.page(
            kind, cursor, limit, truncate_to=max(1, limit // 2) if partial else None, **filters
        )
        return 200, {"items": items, "next_cursor": next_cursor}, {}

    def _write(self, op: str, user_id: str | None, payload: dict[str, str],
               required: bool) -> Reply:
        key = self.headers.get("Idempotency-Key")
        if key is not None:
            key = key.strip()
        if required and not key:
            return _error(400, "idempotency_key_required", "Idempotency-Key header required")
        if key and len(key) > MAX_KEY:
            return _error(400, "bad_request", f"Idempotency-Key longer than {MAX_KEY}")
        fingerprint = hashlib.sha256(
            json.dumps([op, user_id, payload], sort_keys=True).encode()
        ).hexdigest()
        result = self.server.simulator.store.write(
            op, user_id=user_id, payload=payload, key=key or None, fingerprint=fingerprint
        )
        headers = {"Idempotent-Replayed": "true"} if result.replayed else {}
        return result.status, result.body, headers

    @staticmethod
    def _string(body: Any, name: str) -> str:
        value = body.get(name) if isinstance(body, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise BadRequest(f"{name} must be a non-empty string")
        return value.strip()

    # -- the portal API -----------------------------------------------------------------

    def h_list_users(self, query: Mapping[str, list[str]], partial: bool, **_: Any) -> Reply:
        return self._page("users", query, partial, since=self._time(query, "updated_since"),
                          match=self._ids(query, "user_id", "op_patient_id", "op_contact_id"),
                          changed_since=self._time(query, "changed_since"))

    def h_get_user(self, params: dict[str, str], **_: Any) -> Reply:
        user = self.server.simulator.store.get_user(params["user_id"])
        if user is None:
            return _error(404, "not_found", "no such user")
        return 200, user, {}

    def _user_links(self, params: dict[str, str], query: Mapping[str, list[str]],
                    partial: bool, side: str) -> Reply:
        user_id = params["user_id"]
        if not self.server.simulator.store.user_exists(user_id):
            return _error(404, "not_found", "no such user")
        return self._page("links", query, partial, **{side: user_id})

    def h_caregivers(self, params: dict[str, str], query: Mapping[str, list[str]],
                     partial: bool, **_: Any) -> Reply:
        return self._user_links(params, query, partial, "dependent")

    def h_dependents(self, params: dict[str, str], query: Mapping[str, list[str]],
                     partial: bool, **_: Any) -> Reply:
        return self._user_links(params, query, partial, "caregiver")

    def h_list_links(self, query: Mapping[str, list[str]], partial: bool, **_: Any) -> Reply:
        users = self._ids(query, "user_id").get("user_id", [])
        return self._page("links", query, partial, match={
            "caregiver_user_id": users, "dependent_user_id": users,
        })

    def h_list_sources(self, query: Mapping[str, list[str]], partial: bool, **_: Any) -> Reply:
        return self._page("sources", query, partial,
                          match={"user_id": self._ids(query, "user_id").get("user_id", [])})

    def h_list_audit(self, query: Mapping[str, list[str]], partial: bool, **_: Any) -> Reply:
        return self._page("audit", query, partial, since=self._time(query, "since"),
                          action=self._one(query, "action") or None)

    def h_patch_user(self, params: dict[str, str], body: Any, **_: Any) -> Reply:
        email = self._string(body, "email")
        if "@" not in email:
            return _error(422, "invalid_email", "email is not an address")
        return self._write("set_email", params["user_id"], {"email": email}, required=True)

    def h_source_disconnect(self, params: dict[str, str], **_: Any) -> Reply:
        return self._write("source_disconnect", params["user_id"], {}, required=False)

    def h_source_connect(self, params: dict[str, str], **_: Any) -> Reply:
        return self._write("source_connect", params["user_id"], {}, required=False)

    def h_source_refresh(self, params: dict[str, str], **_: Any) -> Reply:
        return self._write("source_refresh", params["user_id"], {}, required=True)

    def h_welcome(self, body: Any, **_: Any) -> Reply:
        payload = {"op_contact_id": self._string(body, "op_contact_id"),
                   "email": self._string(body, "email")}
        if "@" not in payload["email"]:
            return _error(422, "invalid_email", "email is not an address")
        return self._write("welcome", None, payload, required=True)

    # -- administration -----------------------------------------------------------------

    def h_sim_health(self, **_: Any) -> Reply:
        return 200, {"ok": True}, {}

    def _clock_state(self) -> Reply:
        clock = self.server.simulator.clock
        return 200, {"now": iso(clock.now()), "frozen": clock.frozen}, {}

    def h_sim_clock(self, **_: Any) -> Reply:
        return self._clock_state()

    def h_sim_set_clock(self, body: Any, **_: Any) -> Reply:
        clock = self.server.simulator.clock
        if not isinstance(body, dict) or len(body) != 1:
            raise BadRequest('send one of {"now": iso}, {"advance_seconds": n}, '
                             '{"resume": true}, {"real": true}')
        if "now" in body:
            try:
                when = parse_time(body["now"]) if isinstance(body["now"], str) else None
            except ValueError:
                when = None
            if when is None:
                raise BadRequest("now must be an ISO 8601 time")
            clock.set(when)
        elif "advance_seconds" in body:
            step = body["advance_seconds"]
            if not isinstance(step, int | float) or isinstance(step, bool) or step < 0:
                raise BadRequest("advance_seconds must be a non-negative number")
            clock.advance(step)
        elif body.get("resume") is True:
            clock.resume()
        elif body.get("real") is True:
            clock.reset()
        else:
            raise BadRequest("unknown clock command")
        return self._clock_state()

    def h_sim_faults(self, **_: Any) -> Reply:
        return 200, {"faults": self.server.faults.describe()}, {}

    def h_sim_add_faults(self, body: Any, **_: Any) -> Reply:
        if not isinstance(body, dict):
            raise BadRequest("send a JSON object")
        self.server.faults.add(body)
        return self.h_sim_faults()

    def h_sim_clear_faults(self, **_: Any) -> Reply:
        self.server.faults.clear()
        return self.h_sim_faults()

    def h_sim_calls(self, **_: Any) -> Reply:
        return 200, {"writes": self.server.simulator.store.write_counts(),
                     "requests": self.server.request_counts()}, {}

    def h_sim_pending(self, **_: Any) -> Reply:
        return 200, {"items": self.server.simulator.store.pending()}, {}


class SimulatorServer(ThreadingHTTPServer):
    """The simulator on 127.0.0.1; `start()` serves from a daemon thread."""

    daemon_threads = False
    block_on_close = True  # server_close() waits for in-flight handlers

    def __init__(
        self,
        simulator: Simulator,
        *,
        port: int = 0,
        token: str | None = None,
        owns_simulator: bool = False,
    ) -> None:
        super().__init__((HOST, port), _Handler)
        self.simulator = simulator
        self.token = token or None
        self.faults = FaultPlan()
        self.stopping = threading.Event()
        self._owns_simulator = owns_simulator
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._in_flight = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}"

    def count(self, name: str) -> None:
        with self._counts_lock:
            self._counts[name] += 1

    def track(self, delta: int) -> None:
        with self._counts_lock:
            self._in_flight += delta

    def in_flight(self) -> int:
        """Requests being served right now: a test waits for 0 instead of sleeping."""
        with self._counts_lock:
            return self._in_flight

    def request_counts(self) -> dict[str, int]:
        """Every request received per route, faulted ones included (retries show here)."""
        with self._counts_lock:
            return dict(self._counts)

    def start(self) -> str:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05},
            name="portal-simulator", daemon=True,
        )
        self._thread.start()
        return self.base_url

    def shutdown(self) -> None:
        """Stop serving, wait for in-flight requests, release the port (and the store if
        this server created it). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.stopping.set()
        if self._thread is not None:
            super().shutdown()
            self._thread.join()
        self.server_close()
        if self._owns_simulator:
            self.simulator.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return  # a client hanging up is normal here
        log.error("simulator: request handling failed: %s", type(exc).__name__)


def start_simulator(
    simulator: Simulator | None = None,
    *,
    port: int = 0,
    token: str | None = None,
    portal_dir: str | Path | None = None,
    op_dir: str | Path | None = None,
    db_path: str | Path = ":memory:",
    clock: SimClock | None = None,
    delay: timedelta = DEFAULT_DELAY,
    refresh_delay: tuple[timedelta, timedelta] = DEFAULT_REFRESH_DELAY,
    seed: int = 0,
    reload: bool = False,
) -> tuple[SimulatorServer, str]:
    """Serve a simulator from a daemon thread; returns (server, base_url).

    Pass a `Simulator` to keep hold of its store and clock, or let this build one (from
    `portal_dir` if given) that `server.shutdown()` then closes. A `db_path` file that
    already holds a portal is kept as it is (the fixes applied to it survive a restart);
    `reload` loads `portal_dir` over it again.
    """
    owns = simulator is None
    if simulator is None:
        simulator = Simulator(db_path, clock=clock, delay=delay, refresh_delay=refresh_delay,
                              seed=seed)
    try:
        if owns and portal_dir is not None and (reload or not simulator.store.has_data()):
            simulator.load_portal_dir(portal_dir, op_dir=op_dir)
        server = SimulatorServer(simulator, port=port, token=token, owns_simulator=owns)
    except BaseException:
        if owns:
            simulator.close()
        raise
    return server, server.start()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m worker.devtools.simulator`: serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m worker.devtools.simulator",
        description="OP Portal simulator: the portal admin API with its propagation delay.",
    )
    parser.add_argument("--port", type=int, default=8765, help="TCP port on 127.0.0.1 (0: any)")
    parser.add_argument("--portal-dir", type=Path, help="portal CSV export to load at start")
    parser.add_argument("--op-dir", type=Path,
                        help="OP CSV export: the authorizations a source refresh restores")
    parser.add_argument("--db", default=":memory:",
                        help="SQLite file: the portal's state, applied fixes included, kept "
                             "across restarts (default :memory:, forgotten on exit)")
    parser.add_argument("--reload", action="store_true",
                        help="load --portal-dir again even though --db already holds a portal")
    parser.add_argument("--delay-minutes", type=float, default=15.0,
                        help="propagation delay of every change (default 15)")
    parser.add_argument("--refresh-minutes", type=float, nargs=2, default=(10.0, 20.0),
                        metavar=("MIN", "MAX"), help="source refresh delay range (default 10 20)")
    parser.add_argument("--token", default=os.environ.get("OPRECON_PORTAL_TOKEN"),
                        help="bearer token to require (default $OPRECON_PORTAL_TOKEN; none: open)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the refresh delays")
    args = parser.parse_args(argv)
    low, high = sorted(args.refresh_minutes)
    try:
        server, url = start_simulator(
            port=args.port,
            token=args.token,
            portal_dir=args.portal_dir,
            op_dir=args.op_dir,
            db_path=args.db,
            delay=timedelta(minutes=args.delay_minutes),
            refresh_delay=(timedelta(minutes=low), timedelta(minutes=high)),
            seed=args.seed,
            reload=args.reload,
        )
    except (OSError, ValueError) as err:
        print(f"simulator: cannot start: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"portal simulator listening on {url}", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    return 0
