"""Safety rails around every portal write: one global rate limit and a circuit breaker.

Both live in Redis, so every worker process of a practice shares them: Celery's
`rate_limit` is per worker (CELERY.md §1 row 10) and a breaker held in one process's
memory would let the other processes keep hammering a failing portal. Each decision is
one Lua script, so two workers can never both take the last token or both open (and
alert about) the breaker.

The breaker's state is mirrored into the state database (kv "breaker") because the
engine reads it there to stop *planning* fixes while the portal is failing; the guard
here stops *applying* them.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import redis
import structlog
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from worker.fixes.apply import TransientPortalError
from worker.sources.base import SourceUnavailable
from worker.state.db import kv_set

log = structlog.get_logger(__name__)

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

# The settings have no window yet; two minutes sees a burst without remembering an
# outage that is long over.
DEFAULT_WINDOW_SECONDS = 120.0
# A probe whose worker died without reporting frees the half-open slot after this.
DEFAULT_PROBE_LEASE_SECONDS = 60.0
DEFAULT_ACQUIRE_TIMEOUT = 10.0

OnChange = Callable[[str, str], None]
Mirror = Callable[[dict[str, Any]], None]

# KEYS[1] bucket hash; ARGV: rate/s, burst, now ("" = Redis server time), ttl ms.
# Returns {1, 0} when a token was taken, {0, µs until one will be there} otherwise.
_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now
if ARGV[3] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[3])
end
local data = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(data[1])
local ts = tonumber(data[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
  ts = now
end
local granted = 0
local wait_us = 0
if tokens >= 1 then
  tokens = tokens - 1
  granted = 1
else
  wait_us = math.ceil((1 - tokens) / rate * 1000000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {granted, wait_us}
"""

# KEYS: state hash, probe key. ARGV: now, cooldown s, probe id, probe lease ms.
# Returns {state, ticket, seconds to wait, changed}; ticket '' and state != closed = denied.
_BEFORE = """
local now = tonumber(ARGV[1])
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'closed' then
  return {'closed', '', '0', '0'}
end
if state == 'open' then
  local left = tonumber(redis.call('HGET', KEYS[1], 'since') or '0') + tonumber(ARGV[2]) - now
  if left > 0 then
    return {'open', '', tostring(left), '0'}
  end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'since', ARGV[1])
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
  return {'half_open', ARGV[3], '0', '1'}
end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then
  return {'half_open', ARGV[3], '0', '0'}
end
return {'half_open', '', '0', '0'}
"""

# KEYS: state hash, ok zset, fail zset, probe key.
# ARGV: now, ok (1/0), reason, cutoff, min calls, failure ratio, member, ticket, zset ttl ms.
# Returns {state, changed, notify, failures, calls}.
_RECORD = """
local ok = ARGV[2] == '1'
local reason = ARGV[3]
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local function open_now(failures, calls)
  local alerted = redis.call('HGET', KEYS[1], 'alerted')
  redis.call('HSET', KEYS[1], 'state', 'open', 'since', ARGV[1], 'reason', reason,
             'alerted', reason)
  redis.call('DEL', KEYS[2], KEYS[3])
  local notify = '1'
  if alerted == reason then notify = '0' end
  return {'open', '1', notify, tostring(failures), tostring(calls)}
end
if state == 'half_open' then
  if ARGV[8] == '' or redis.call('GET', KEYS[4]) ~= ARGV[8] then
    return {state, '0', '0', '0', '0'}
  end
  redis.call('DEL', KEYS[4])
  if ok then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'since', ARGV[1], 'reason', '')
    redis.call('HDEL', KEYS[1], 'alerted')
    redis.call('DEL', KEYS[2], KEYS[3])
    return {'closed', '1', '1', '0', '1'}
  end
  return open_now(1, 1)
end
if state == 'open' then
  return {state, '0', '0', '0', '0'}
end
local target = KEYS[3]
if ok then target = KEYS[2] end
redis.call('ZADD', target, ARGV[1], ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[4])
redis.call('PEXPIRE', target, ARGV[9])
local failures = redis.call('ZCARD', KEYS[3])
local calls = failures + redis.call('ZCARD', KEYS[2])
if (not ok) and calls >= tonumber(ARGV[5]) and failures >= tonumber(ARGV[6]) * calls then
  return open_now(failures, calls)
end
return {'closed', '0', '0', tostring(failures), tostring(calls)}
"""

# KEYS: probe key. ARGV: ticket. Frees the half-open slot if this caller holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TokenBucket:
    """One token bucket in Redis shared by every client that uses the same key.

    `rate_per_second` tokens drip in continuously up to `burst`. Time comes from the Redis
    server (one clock for every worker) unless a `clock` is injected (tests).
    """

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        rate_per_second: float,
        burst: int,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.key = key
        self.rate = float(rate_per_second)
        self.burst = int(burst)
        self._clock = clock
        self._sleep = sleep
        self._script = client.register_script(_BUCKET)
        # A full bucket needs no state: let Redis drop it once it would have refilled.
        self._ttl_ms = int(math.ceil(self.burst / self.rate * 1000)) + 1000

    def try_acquire(self) -> float:
        """Take a token now: 0.0 when taken, else the seconds until one will be free."""
        now = "" if self._clock is None else repr(float(self._clock()))
        granted, wait_us = self._script(
            keys=[self.key], args=[repr(self.rate), self.burst, now, self._ttl_ms]
        )
        return 0.0 if int(granted) == 1 else max(int(wait_us), 1) / 1_000_000

    def acquire(self, timeout: float) -> bool:
        """Wait (sleeping) up to `timeout` seconds for a token; False if none came."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            wait = self.try_acquire()
            if wait == 0.0:
                return True
            left = deadline - time.monotonic()
            # Tokens only ever arrive at `rate`: waiting less than `wait` cannot help.
            if wait > left:
                return False
            self._sleep(wait)


class BreakerOpen(TransientPortalError):
    """The portal is failing: no call is made until the cooldown's probe succeeds."""


class CircuitBreaker:
    """closed → open → half_open → closed|open, shared through Redis.

    closed: calls go through; their outcomes fill a sliding window. Once the window
    holds at least `min_calls` outcomes and failures ≥ `failure_ratio` of them, the
    breaker opens. open: every call is refused (`BreakerOpen`) for `cooldown_seconds`.
    half_open: one probe call at a time goes through; success closes the breaker,
    failure opens it for another cooldown.

    `clock` (wall-clock seconds) defaults to `time.time`, read at each call so freezegun
    can drive it; every worker must share the same notion of the cooldown.

    `on_change(state, reason)` is the staff alert: called when the breaker opens (once;
    a reopen after a failed probe calls it again only if the reason changed, the last
    reason being kept in Redis) and when it closes again. Every state change, half_open
    included, goes to `mirror(dict)` (the state database, see `kv_mirror`).
    """

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        failure_ratio: float,
        min_calls: int,
        window_seconds: float,
        cooldown_seconds: float,
        on_change: OnChange | None = None,
        clock: Callable[[], float] | None = None,
        *,
        mirror: Mirror | None = None,
        probe_lease_seconds: float = DEFAULT_PROBE_LEASE_SECONDS,
    ) -> None:
        if not 0 < failure_ratio <= 1:
            raise ValueError("failure_ratio must be in (0, 1]")
        if min_calls < 1 or window_seconds <= 0 or cooldown_seconds <= 0:
            raise ValueError("min_calls, window_seconds and cooldown_seconds must be positive")
        self.key = key
        self.failure_ratio = failure_ratio
        self.min_calls = min_calls
        self.window = float(window_seconds)
        self.cooldown = float(cooldown_seconds)
        self.on_change = on_change
        self.mirror = mirror
        # time.time looked up per call (not bound here), so freezegun can drive it.
        self._clock = clock or (lambda: time.time())
        self._client = client
        self._keys = {name: f"{key}:{name}" for name in ("state", "ok", "fail", "probe")}
        self._lease_ms = int(probe_lease_seconds * 1000)
        self._before = client.register_script(_BEFORE)
        self._record = client.register_script(_RECORD)
        self._release = client.register_script(_RELEASE)

    # -- reading --------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """{"state", "reason", "since"} as stored (an open breaker past its cooldown
        still reads open until the next call probes)."""
        raw: dict[Any, Any] = self._client.hgetall(self._keys["state"])  # type: ignore[assignment]
        data = {_text(k): _text(v) for k, v in raw.items()}
        since = data.get("since")
        return {
            "state": data.get("state", CLOSED),
            "reason": data.get("reason") or None,
            "since": _iso(float(since)) if since else None,
        }

    # -- the call protocol ----------------------------------------------------------------

    def before_call(self) -> str:
        """Permission for one call: returns its ticket ("" when closed, a probe id when
        half-open) to hand back to `record`; raises BreakerOpen when refused."""
        now = float(self._clock())
        probe = uuid.uuid4().hex
        state, ticket, wait, changed = (
            _text(x)
            for x in self._before(
                keys=[self._keys["state"], self._keys["probe"]],
                args=[repr(now), repr(self.cooldown), probe, self._lease_ms],
            )
        )
        if changed == "1":
            self._changed(HALF_OPEN, "cooldown over: probing the portal with one call", now,
                          alert=False)
        if state == CLOSED or ticket:
            return ticket
        if state == OPEN:
            raise BreakerOpen(
                f"portal circuit breaker is open; next probe in {float(wait):.0f}s"
            )
        raise BreakerOpen("portal circuit breaker is half-open; another call is probing")

    def record(self, ok: bool, reason: str | None = None, ticket: str = "") -> None:
        """The outcome of a call that `before_call` let through."""
        now = float(self._clock())
        cause = (reason or "portal call failed")[:200] if not ok else ""
        state, changed, notify, failures, calls = (
            _text(x)
            for x in self._record(
                keys=[self._keys["state"], self._keys["ok"], self._keys["fail"],
                      self._keys["probe"]],
                args=[repr(now), "1" if ok else "0", cause, repr(now - self.window),
                      self.min_calls, repr(self.failure_ratio), f"{now!r}:{uuid.uuid4().hex}",
                      ticket, int(self.window * 1000) + 1000],
            )
        )
        if changed != "1":
            return
        if state == OPEN:
            log.warning("portal_breaker_open", reason=cause, failures=int(failures),
                        calls=int(calls), cooldown_seconds=self.cooldown)
            self._changed(OPEN, cause, now, alert=notify == "1")
        else:
            log.info("portal_breaker_closed")
            self._changed(CLOSED, "the portal answered the probe call", now, alert=True)

    def release(self, ticket: str) -> None:
        """Give back a probe slot that was granted but not used (no call was made)."""
        if ticket:
            self._release(keys=[self._keys["probe"]], args=[ticket])

    # -- telling others -------------------------------------------------------------------

    def _changed(self, state: str, reason: str, now: float, *, alert: bool) -> None:
        if self.mirror is not None:
            value: dict[str, Any] = {"state": state, "reason": reason, "since": _iso(now)}
            if state == OPEN:
                value["until"] = _iso(now + self.cooldown)
            try:
                self.mirror(value)
            except Exception:  # noqa: BLE001 — the state DB being down must not stop the guard
                log.exception("portal_breaker_mirror_failed", state=state)
        if alert and self.on_change is not None:
            try:
                self.on_change(state, reason)
            except Exception:  # noqa: BLE001 — an alert hook must not fail a portal call
                log.exception("portal_breaker_alert_failed", state=state)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def kv_mirror(sessions: sessionmaker[Session], practice: str) -> Mirror:
    """Write breaker changes to kv "breaker", where the engine's fix gate reads them."""

    def write(value: dict[str, Any]) -> None:
        with sessions() as session, session.begin():
            kv_set(session, practice, "breaker", value, datetime.now(UTC))

    return write


class PortalGuard:
    """The CallGuard of worker.fixes.apply: breaker first (cheap, and a refused call must not
    spend a token), then a token from the global bucket.

    `record` counts only calls this guard let through, so a call refused by the
    breaker or the bucket is never mistaken for a portal failure (or for the probe).
    It never raises: the portal call it reports on has already happened.
    """

    def __init__(
        self,
        bucket: TokenBucket,
        breaker: CircuitBreaker,
        acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT,
    ) -> None:
        self.bucket = bucket
        self.breaker = breaker
        self.acquire_timeout = acquire_timeout
        self._local = threading.local()

    def before_call(self) -> None:
        self._local.ticket = None
        try:
            ticket = self.breaker.before_call()
        except redis.RedisError as err:
            raise TransientPortalError("portal guard unavailable (Redis)") from err
        try:
            granted = self.bucket.acquire(self.acquire_timeout)
        except redis.RedisError as err:
            self._give_back(ticket)
            raise TransientPortalError("portal guard unavailable (Redis)") from err
        if not granted:
            self._give_back(ticket)
            raise TransientPortalError(
                f"portal rate limit: no token within {self.acquire_timeout:g}s"
            )
        self._local.ticket = ticket

    def record(self, ok: bool, reason: str | None = None) -> None:
        ticket = getattr(self._local, "ticket", None)
        self._local.ticket = None
        if ticket is None:
            return  # no call was let through: nothing to learn about the portal
        try:
            self.breaker.record(ok, reason, ticket)
        except redis.RedisError:
            log.warning("portal_breaker_record_failed", ok=ok)

    def _give_back(self, ticket: str) -> None:
        try:
            self.breaker.release(ticket)
        except redis.RedisError:
            log.warning("portal_breaker_release_failed")


@lru_cache(maxsize=8)
def _client(url: str) -> redis.Redis:
    """One pool per Redis URL per process: a guard is built for every fix task."""
    return redis.Redis.from_url(
        url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
    )


def _log_alert(state: str, reason: str) -> None:
    log.warning("portal_breaker_alert", state=state, reason=reason)


def portal_guard(
    settings: Settings,
    *,
    on_change: OnChange | None = None,
    client: redis.Redis | None = None,
    sessions: sessionmaker[Session] | None = None,
) -> PortalGuard:
    """The guard every fix uses, from settings; keys are `oprecon:<practice>:portal:*`.

    `on_change` defaults to a warning log line; the kv mirror uses the state database
    of `settings` (not migrated here: the worker did that at start).
    """
    client = client or _client(settings.redis_url)
    prefix = f"oprecon:{settings.practice}:portal"
    rate = settings.portal_rate_per_second
    bucket = TokenBucket(client, f"{prefix}:bucket", rate, burst=max(1, math.floor(rate)))
    if sessions is None:
        from worker.scan.wiring import state_sessions

        sessions = state_sessions(settings, migrate_first=False)
    breaker = CircuitBreaker(
        client,
        f"{prefix}:breaker",
        failure_ratio=settings.breaker_failure_ratio,
        min_calls=settings.breaker_min_calls,
        window_seconds=settings.breaker_window_seconds,
        cooldown_seconds=settings.breaker_cooldown_seconds,
        on_change=on_change or _log_alert,
        mirror=kv_mirror(sessions, settings.practice),
    )
    return PortalGuard(bucket, breaker)


class ReadThrottled(SourceUnavailable):
    """No portal read token came within the wait: the portal is being read hard."""


def read_throttle(
    settings: Settings, *, client: redis.Redis | None = None, timeout: float = 30.0
) -> Callable[[], None]:
    """What an HTTP portal calls before each read: take a token from the practice's read
    bucket (`oprecon:<practice>:portal:read-bucket`, `portal_read_rate_per_second`,
    shared by every worker process, apart from the writes' bucket), waiting for one."""
    client = client or _client(settings.redis_url)
    rate = settings.portal_read_rate_per_second
    bucket = TokenBucket(client, f"oprecon:{settings.practice}:portal:read-bucket", rate,
                         burst=max(1, math.floor(rate)))

    def before_read() -> None:
        if not bucket.acquire(timeout):
            raise ReadThrottled(f"portal read rate limit: no token within {timeout:.0f}s")

    return before_read


def throttle_reads(settings: Settings, portal: Any) -> None:
    """Attach the shared read limit to a portal adapter that offers the hook."""
    if hasattr(portal, "before_read") and getattr(portal, "before_read", None) is None:
        portal.before_read = read_throttle(settings)
