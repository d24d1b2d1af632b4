"""Single-flight: one scan of a practice at a time, across every worker and on-call.

A redis-py lock whose expiry outlives the scan's hard time limit, so a killed worker
cannot leave it stuck for longer than that (CELERY.md §1 row 2).

Longer than that is still too long when the holder is known to be dead: a pool child
killed mid-scan (the OOM killer) gets its message requeued at once (acks_late +
reject_on_worker_lost), and the redelivered scan would be skipped — and acked, so lost —
behind its own dead attempt's lock, as would every scan after it until the lock expired
(scan_hard_limit + 60 s; 16 minutes by default). So the lock's value names its holder
(host, pid, process start time), and a scan that finds it held by a process of this host
that no longer exists takes it over. A holder on another host, or one still alive (a
message redelivered after a broker connection loss while its first attempt still runs),
is never taken over: only the expiry frees those.

Fair waiting: a run allowed to wait (an on-call `--all` run) takes a ticket in a queue
(a sorted set beside the lock) and the lock goes to the oldest live ticket when it comes
free; a run that does not wait (a periodic scan) gets it only when nobody is queued.
Before this, waiters polled every 0.1 s while a newly started task tried at once, so a
waiter could be overtaken again and again until its limit ran out. A waiter that dies
stops refreshing its ticket's liveness key (`WAITER_TTL_MS`) and is dropped from the
head of the queue by the next attempt.

Family-scoped runs (an on-call `--patient`/`--contact` run, the verify tick) take no
practice lock at all: they read only their neighbourhood and hold the short **state
write lock** (`state_write`) while they fold their result into the state database.
Practice scans hold the write lock only for their own write phase and, there, leave
alone every id a family run has written from a read newer than theirs (the *fences*):
whichever wrote last wrote from the freshest read. docs/operations.md, "Locks".
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import structlog
from redis.lock import Lock

from config.settings import Settings

log = structlog.get_logger(__name__)

# Replace the value only if it is still the dead holder's, with our token and expiry.
_TAKE_OVER = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('set', KEYS[1], ARGV[2], 'px', ARGV[3])
end
return false
"""


# The lock goes to the oldest live waiter (KEYS[2], a sorted set of tokens by ticket; a
# waiter is live while ARGV[3]..token exists); a caller not in the queue gets it only
# when the queue is empty. KEYS[1] lock; ARGV: token, ttl ms, liveness key prefix.
_FAIR_ACQUIRE = """
while true do
  local head = redis.call('zrange', KEYS[2], 0, 0)[1]
  if not head or head == ARGV[1] or redis.call('exists', ARGV[3] .. head) == 1 then
    break
  end
  redis.call('zrem', KEYS[2], head)
end
local head = redis.call('zrange', KEYS[2], 0, 0)[1]
if head and head ~= ARGV[1] then
  return 0
end
if redis.call('set', KEYS[1], ARGV[1], 'nx', 'px', ARGV[2]) then
  redis.call('zrem', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

WAITER_TTL_MS = 3000
POLL_SECONDS = 0.05


class ScanBusy(RuntimeError):
    """Another scan of this practice holds the lock."""

    def __init__(self, message: str, holder: str | None = None) -> None:
        super().__init__(message)
        self.holder = holder  # "host pid N" of the holder, when known


class StaleRead(RuntimeError):
    """A practice scan committed a fresher read of this family meanwhile: read again."""


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
    )


def scan_lock(settings: Settings, client: redis.Redis | None = None) -> Lock:
    client = client or redis_client(settings)
    return client.lock(
        f"oprecon:{settings.practice}:scan",
        timeout=settings.lock_timeout_seconds,
        thread_local=False,
    )


def write_lock(settings: Settings, client: redis.Redis | None = None) -> Lock:
    """The state write lock: held for a run's write phase only (module docstring)."""
    client = client or redis_client(settings)
    return client.lock(
        f"oprecon:{settings.practice}:state-write",
        timeout=settings.lock_timeout_seconds,
        thread_local=False,
    )


def describe_holder(value: bytes | None) -> str | None:
    """"host pid N" from a holder token (ids only), or None when unknown."""
    if value is None:
        return None
    try:
        host, pid = value.decode().split("|")[:2]
    except (UnicodeDecodeError, ValueError):
        return "unknown holder"
    return f"{host} pid {pid}"


def holder_of(lock: Lock) -> str | None:
    try:
        return describe_holder(lock.redis.get(lock.name))
    except redis.RedisError:
        return None


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a process (ticks since boot): a pid can be reused, a
    (pid, start time) pair cannot. None when there is no such process, or only its zombie
    (killed, not yet reaped); "?" when this system cannot say (no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else "?"
    except OSError:
        return "?"
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
    return None if fields[0] in ("Z", "X") else fields[19]


def holder_token() -> str:
    """host|pid|start time|random: who holds the lock, in a form `_holder_dead` reads."""
    pid = os.getpid()
    return f"{socket.gethostname()}|{pid}|{_start_time(pid) or '?'}|{uuid.uuid4().hex}"


def _holder_dead(value: bytes) -> bool:
    """True only when the holder certainly no longer runs: a process of this host that
    is gone (or whose pid now belongs to another process). Anything else — another host,
    a token in another format, a system without /proc — is treated as alive."""
    try:
        host, pid, start, _ = value.decode().split("|")
    except (UnicodeDecodeError, ValueError):
        return False
    if host != socket.gethostname() or start == "?" or not pid.isdigit():
        return False
    now = _start_time(int(pid))
    return now != "?" and now != start


def _take_over(lock: Lock, token: str) -> bool:
    held = lock.redis.get(lock.name)
    if held is None or not _holder_dead(held):
        return False
    ttl_ms = int((lock.timeout or 0) * 1000)
    if not lock.redis.eval(_TAKE_OVER, 1, lock.name, held, token, ttl_ms):
        return False  # it changed hands meanwhile
    lock.local.token = token.encode()
    host, pid = held.decode().split("|")[:2]
    log.warning("scan_lock_reclaimed", holder_host=host, holder_pid=int(pid),
                reason="the scan holding it died")
    return True


def _fair_try(lock: Lock, token: str) -> bool:
    ttl_ms = int((lock.timeout or 0) * 1000)
    got = lock.redis.eval(_FAIR_ACQUIRE, 2, lock.name, f"{lock.name}:queue", token, ttl_ms,
                          f"{lock.name}:waiter:")
    if got:
        lock.local.token = token.encode()
    return bool(got)


def fair_acquire(lock: Lock, token: str, wait_seconds: float) -> bool:
    """Take the lock now (if nobody waits for it), or queue for it for `wait_seconds`:
    the oldest live waiter gets it first (module docstring)."""
    if _fair_try(lock, token) or _take_over(lock, token):
        return True
    if wait_seconds <= 0:
        return False
    queue, alive = f"{lock.name}:queue", f"{lock.name}:waiter:{token}"
    client = lock.redis
    client.set(alive, b"1", px=WAITER_TTL_MS)
    ticket = client.incr(f"{lock.name}:tickets")
    client.zadd(queue, {token: ticket})
    deadline = time.monotonic() + wait_seconds
    try:
        while True:
            client.set(alive, b"1", px=WAITER_TTL_MS)
            if _fair_try(lock, token) or _take_over(lock, token):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
    finally:
        with contextlib.suppress(redis.RedisError):
            client.zrem(queue, token)
            client.delete(alive)


@contextmanager
def single_flight(
    settings: Settings, *, wait_seconds: float = 0, client: redis.Redis | None = None
) -> Iterator[Lock]:
    """Hold the scan lock for the block, or raise ScanBusy (after waiting, if asked to)."""
    with _held(scan_lock(settings, client), wait_seconds,
               f"another scan of practice {settings.practice} is running") as lock:
        yield lock


@contextmanager
def _held(lock: Lock, wait_seconds: float, busy: str) -> Iterator[Lock]:
    """Take `lock` in turn (fair waiting) for the block, or raise ScanBusy(busy)."""
    if not fair_acquire(lock, holder_token(), wait_seconds):
        raise ScanBusy(busy, holder_of(lock))
    try:
        yield lock
    finally:
        # It may have expired while we ran: the next holder may already own it.
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()


# -- the state write lock and the fences --------------------------------------------------


@dataclass
class Ceded:
    """Ids a practice scan leaves alone: a family run wrote them from a newer read."""

    patients: frozenset[str] = frozenset()
    contacts: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.patients or self.contacts or self.users)


_PREFIX = {"p": "patients", "c": "contacts", "u": "users"}


def _fences_key(settings: Settings) -> str:
    return f"oprecon:{settings.practice}:fences"


def _practice_read_key(settings: Settings) -> str:
    return f"oprecon:{settings.practice}:practice-read"


@contextmanager
def state_write(
    settings: Settings, *, wait_seconds: float, client: redis.Redis | None = None
) -> Iterator[Lock]:
    """Hold the state write lock for the block (fair waiting), or raise ScanBusy."""
    with _held(write_lock(settings, client), wait_seconds,
               f"the state of practice {settings.practice} is being written") as lock:
        yield lock


@contextmanager
def practice_write(
    settings: Settings, read_at: float, *, wait_seconds: float,
    client: redis.Redis | None = None,
) -> Iterator[Ceded]:
    """A practice scan's write phase, for a scan whose read started at `read_at` (epoch
    seconds): yields the ids family runs wrote from newer reads (to leave alone), and
    once the block has committed marks `read_at` as the newest committed practice read."""
    client = client or redis_client(settings)
    with state_write(settings, wait_seconds=wait_seconds, client=client):
        raw: Any = client.zrangebyscore(_fences_key(settings), f"({read_at!r}", "+inf")
        found: dict[str, set[str]] = {"patients": set(), "contacts": set(), "users": set()}
        for member in raw:
            kind, _, ident = member.decode().partition(":")
            if kind in _PREFIX and ident:
                found[_PREFIX[kind]].add(ident)
        yield Ceded(frozenset(found["patients"]), frozenset(found["contacts"]),
                    frozenset(found["users"]))
        previous: Any = client.get(_practice_read_key(settings))
        if previous is None or float(previous) < read_at:
            client.set(_practice_read_key(settings), repr(read_at),
                       ex=settings.lock_timeout_seconds * 2)


@contextmanager
def family_write(
    settings: Settings, read_at: float, patients: frozenset[str], contacts: frozenset[str],
    users: frozenset[str], *, wait_seconds: float, client: redis.Redis | None = None,
) -> Iterator[None]:
    """A family-scoped run's write phase, for a read that started at `read_at`: raises
    StaleRead when a practice scan that read later has committed (read again), else
    fences the family's ids so a practice scan still running from an older read leaves
    them alone."""
    client = client or redis_client(settings)
    with state_write(settings, wait_seconds=wait_seconds, client=client):
        newest: Any = client.get(_practice_read_key(settings))
        if newest is not None and float(newest) > read_at:
            raise StaleRead("a practice scan committed a newer read of this family")
        members = {f"p:{i}": read_at for i in patients}
        members.update({f"c:{i}": read_at for i in contacts})
        members.update({f"u:{i}": read_at for i in users})
        key = _fences_key(settings)
        pipe = client.pipeline()
        if members:
            pipe.zadd(key, members, gt=True)
        # A fence matters only to a practice scan still running: at most the lock's life.
        pipe.zremrangebyscore(key, "-inf", read_at - settings.lock_timeout_seconds)
        pipe.expire(key, settings.lock_timeout_seconds * 2)
        pipe.execute()
        yield
