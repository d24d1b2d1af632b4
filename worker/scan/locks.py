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
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


class ScanBusy(RuntimeError):
    """Another scan of this practice holds the lock."""


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


@contextmanager
def single_flight(
    settings: Settings, *, wait_seconds: float = 0, client: redis.Redis | None = None
) -> Iterator[Lock]:
    """Hold the scan lock for the block, or raise ScanBusy (after waiting, if asked to)."""
    lock = scan_lock(settings, client)
    token = holder_token()
    got = lock.acquire(blocking=False, token=token) or _take_over(lock, token)
    if not got and wait_seconds > 0:
        got = lock.acquire(blocking=True, blocking_timeout=wait_seconds, token=token)
    if not got:
        raise ScanBusy(f"another scan of practice {settings.practice} is running")
    try:
        yield lock
    finally:
        # It may have expired while we ran: the next scan may already own it.
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()
