"""The portal over its admin HTTP API (`worker/sources/openapi/portal.yaml`).

Failures are sorted by what the caller should do next:

- `PortalUnavailable` (transient): timeouts, dropped connections, 429 and 5xx, still
  failing after bounded retries. Try again later; a breaker may open. For a write that
  may have been applied (`in_doubt`), "later" means after a re-read, never at once.
- `PortalRejected` (terminal): any other 4xx. Retrying the same request cannot help.
- `PortalProtocolError` (terminal for the call): the portal answered something that is not
  the contract (broken JSON, a page of the wrong shape, a page of nothing but bad items).

Only the first group is retried, with exponential backoff and full jitter, honouring
Retry-After, inside a per-call sleep budget well under a minute so a Celery task's time
limits stay meaningful (CELERY.md §1 rows 9 and 11). A write is retried only when it
surely did not reach the portal (the connection was never made) or the portal said it
did not process it (429). A write that timed out or lost its connection after sending,
or that the portal answered with a 5xx, may have been applied (a server error can come
after the change was made), so it is not sent again — `PortalUnavailable.in_doubt` says
so and the fix decides from a re-read (worker.fixes.apply), not from the portal's
idempotency.

One item that does not parse becomes an `InvalidRecord` and the read goes on; bad data is
a finding, not a failed run. Errors and logs name methods, routes and ids, never values.

Incremental scans use the targeted reads `select_users` / `select_links` /
`select_sources`: the list endpoints' id filters, at most `SELECT_BATCH` ids a request, so
a scan reads the changed neighbourhood instead of paging through the whole portal.
"""

from __future__ import annotations

import json
import random
import ssl
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
import structlog

from worker.model.records import (
    AuditEvent,
    CaregiverLink,
    InvalidRecord,
    PortalSource,
    PortalUser,
)
from worker.model.text import id_problem, strip_controls
from worker.sources.base import SourceError, SourceUnavailable
from worker.sources.layout import PORTAL_LAYOUT
from worker.sources.parsing import PARSERS, invalid, parse_portal_user

log = structlog.get_logger(__name__)

OnCall = Callable[[str, str, int | None, float], None]
"""`on_call(method, route, status, seconds)` after every HTTP attempt; status None when no
response came (timeout, connection). `route` is the template, e.g. "/users/{user_id}",
so metric labels stay low-cardinality."""

# A page this big on which every item is unreadable means the API changed shape, not
# that the data is bad: stop instead of raising thousands of invalid_record findings.
SCHEMA_DRIFT_MIN_ITEMS = 3

# Ids per targeted-read request: the API's limit (portal.yaml), and URLs stay short.
SELECT_BATCH = 100


class PortalError(SourceError):
    """A portal call failed; `kind` says how, `status` is the last HTTP status if any."""

    transient: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        method: str,
        path: str,
        kind: str,
        status: int | None = None,
        attempts: int = 1,
        in_doubt: bool = False,
    ) -> None:
        super().__init__(message)
        self.method = method
        self.path = path
        self.kind = kind
        self.status = status
        self.attempts = attempts
        # A write that may have reached the portal although no answer came back.
        self.in_doubt = in_doubt


class PortalUnavailable(PortalError, SourceUnavailable):
    """Transient: the portal did not answer usefully within the retries. Try later."""

    transient = True


class PortalRejected(PortalError):
    """Terminal: the portal refused this request (4xx other than 429)."""


class PortalProtocolError(PortalError):
    """Terminal for this call: the answer does not follow the API contract."""


class PortalTlsError(PortalError):
    """Terminal: the TLS handshake failed (an untrusted or wrong certificate). Retrying
    cannot fix a certificate, and calling it a connection problem hides the cause."""


class PortalLimitError(PortalProtocolError):
    """Terminal: an answer over a bound (size, time, pages): a broken or hostile
    portal must not exhaust memory or hold a scan forever."""


def segment(user_id: str) -> str:
    """One portal id as a URL path segment, fully encoded. `.`/`..` (which a URL
    resolves to the parent: PATCH /users/.. is PATCH /), slashes and control characters
    are refused: the sources reject such ids, so one here is a bug or an attack."""
    why = id_problem(user_id) if user_id else "is blank"
    if why is not None:
        raise PortalRejected(
            f"refusing portal user id {strip_controls(user_id)[:64]!r}: it {why}",
            method="-", path="-", kind="bad_id")
    return quote(user_id, safe="")


def _tls_failure(err: BaseException) -> str | None:
    """The TLS reason behind a connection error, if that is what it was."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLError):
            reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
            return str(reason or cause).strip() or "handshake failed"
        cause = cause.__cause__ or cause.__context__
    text = str(err)
    if "CERTIFICATE_VERIFY_FAILED" in text or "SSL" in text:
        return text.splitlines()[0][:120] if text else "handshake failed"
    return None


@dataclass
class CallStats:
    """Per-attempt counts and recent latencies, for metrics and a circuit breaker.

    `failed` counts attempts that say the portal is unwell (no response, 429, 5xx); a
    404 or 422 is the portal working correctly and counts as `ok`.
    """

    ok: int = 0
    failed: int = 0
    retries: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=1024))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, status: int | None, kind: str | None, seconds: float) -> None:
        with self._lock:
            self.latencies.append(seconds)
            self.by_status[str(status) if status is not None else (kind or "error")] += 1
            if status is None or status == 429 or status >= 500:
                self.failed += 1
            else:
                self.ok += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            ordered = sorted(self.latencies)
            p95 = ordered[int(0.95 * (len(ordered) - 1))] if ordered else None
            return {"ok": self.ok, "failed": self.failed, "retries": self.retries,
                    "by_status": dict(self.by_status), "latency_p95": p95,
                    "latency_last": self.latencies[-1] if self.latencies else None}

    def count_retry(self) -> None:
        with self._lock:
            self.retries += 1


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta or HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _text(value: Any) -> str | None:
    """A JSON value in the CSV contract's text form (what the shared parsers read)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    raise TypeError


def _iso(when: datetime) -> str:
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).isoformat()


def _batches(
    selectors: Mapping[str, Collection[str]], size: int
) -> Iterator[dict[str, list[str]]]:
    """{query parameter: ids} as requests of at most `size` ids in all, in a stable
    order. Blank ids are dropped: they name no readable record and the API refuses them."""
    batch: dict[str, list[str]] = {}
    room = size
    for name, values in selectors.items():
        ids = sorted({v.strip() for v in values if v and v.strip()})
        while ids:
            taken, ids = ids[:room], ids[room:]
            batch.setdefault(name, []).extend(taken)
            room -= len(taken)
            if not room:
                yield batch
                batch, room = {}, size
    if batch:
        yield batch


def _decoder(response: httpx.Response, method: str, path: str) -> Any:
    """A zlib decompressor for the body's Content-Encoding (None: identity). Ours, not
    httpx's, so that no single chunk inflates past the cap (httpx's would unpack a
    64 KB chunk of a gzip bomb to 64 MB at once)."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    raise PortalProtocolError(
        f"portal {method} {path}: unsupported Content-Encoding {strip_controls(encoding)[:20]}",
        method=method, path=path, kind="decoding", status=response.status_code)


def _read_capped(response: httpx.Response, cap: int, abandoned: threading.Event,
                 method: str, path: str) -> bytes | None:
    """The decoded body, at most `cap` bytes of it (PortalLimitError beyond); None when
    the caller gave up waiting."""
    def over() -> PortalLimitError:
        return PortalLimitError(
            f"portal {method} {path}: response over {cap} bytes (portal_max_response_bytes)",
            method=method, path=path, kind="too_large", status=response.status_code)

    if response.is_stream_consumed:  # built in memory (a transport that read it already)
        if len(response.content) > cap:
            raise over()
        return response.content
    decoder = _decoder(response, method, path)
    body = bytearray()

    try:
        for raw in response.iter_raw(64 * 1024):
            if abandoned.is_set():
                return None
            if decoder is None:
                body += raw
            else:
                while raw:
                    body += decoder.decompress(raw, cap - len(body) + 1)
                    if len(body) > cap:
                        raise over()
                    raw = decoder.unconsumed_tail
            if len(body) > cap:
                raise over()
        if decoder is not None:
            body += decoder.flush()
    except zlib.error as err:
        raise httpx.DecodingError(f"bad {response.headers.get('content-encoding')} body"
                                  ) from err
    if len(body) > cap:
        raise over()
    return bytes(body)


class HttpPortal:
    """PortalReader and PortalWriter over the portal admin API."""

    writable = True

    def __init__(
        self,
        base_url: str,
        token: str | None,
        timeout: float = 10.0,
        max_retries: int = 3,
        page_size: int = 500,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        *,
        on_call: OnCall | None = None,
        backoff_base: float = 0.5,
        backoff_cap: float = 8.0,
        backoff_budget: float = 30.0,
        retry_after_cap: float = 20.0,
        rng: random.Random | None = None,
        select_batch: int = SELECT_BATCH,
        max_response_bytes: int = 64 * 1024 * 1024,
        request_deadline: float = 60.0,
        max_pages: int = 10_000,
        before_read: Callable[[], None] | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if not 1 <= page_size <= 1000:
            raise ValueError("page_size must be between 1 and 1000")
        if not 1 <= select_batch <= SELECT_BATCH:
            raise ValueError(f"select_batch must be between 1 and {SELECT_BATCH}")
        reveal = getattr(token, "get_secret_value", None)  # pydantic SecretStr from settings
        if callable(reveal):
            token = reveal()
        self.max_retries = max_retries
        self.max_response_bytes = max_response_bytes
        self.request_deadline = request_deadline
        self.max_pages = max_pages
        self.page_size = page_size
        self.select_batch = select_batch
        self.on_call = on_call
        # Called before every GET attempt: the shared read rate limit (worker.fixes.rails
        # `read_throttle`); it waits for a token or raises.
        self.before_read = before_read
        self.call_stats = CallStats()
        self._sleep = sleep
        self._backoff = (backoff_base, backoff_cap, backoff_budget, retry_after_cap)
        self._rng = rng or random.Random()
        # Connecting should be quick; a slow answer may legitimately take the full timeout.
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 5.0))
        # Only the encodings _decoder bounds (httpx would also offer br/zstd if installed).
        headers = {"Accept": "application/json", "User-Agent": "oprecon",
                   "Accept-Encoding": "gzip, deflate"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=self._timeout,
            transport=transport,
            follow_redirects=False,
        )

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> HttpPortal:
        """Build from `config.settings.Settings` (portal_url, token, timeout, retries)."""
        if not settings.portal_url:
            raise SourceError("OPRECON_PORTAL_URL is required for the http portal source")
        return cls(
            settings.portal_url,
            settings.portal_token,
            timeout=settings.portal_timeout_seconds,
            max_retries=settings.portal_max_retries,
            max_response_bytes=settings.portal_max_response_bytes,
            request_deadline=settings.portal_request_deadline_seconds,
            max_pages=settings.portal_max_pages,
            **kwargs,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpPortal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the one place that talks HTTP --------------------------------------------------

    def _notify(self, method: str, route: str, status: int | None, kind: str | None,
                seconds: float) -> None:
        self.call_stats.record(status, kind, seconds)
        if self.on_call is not None:
            try:
                self.on_call(method, route, status, seconds)
            except Exception:  # a metrics hook must never fail a portal call
                log.warning("portal_on_call_hook_failed", method=method, route=route)

    def _request(
        self,
        method: str,
        route: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        ok_statuses: frozenset[int] = frozenset(),
        write: bool = False,
    ) -> httpx.Response:
        """Send with retries; returns a 2xx (or an `ok_statuses`) response or raises.
        `write`: a request that may have been sent without an answer is not repeated."""
        base, cap, budget, retry_cap = self._backoff
        slept = 0.0
        attempt = 0
        while True:
            attempt += 1
            if method == "GET" and self.before_read is not None:
                self.before_read()
            started = time.perf_counter()
            status: int | None = None
            retry_after: float | None = None
            sent = True  # as far as we can tell, the portal may have the request
            try:
                response = self._bounded(method, path, params, json, headers)
            except PortalLimitError as err:
                self._notify(method, route, None, err.kind, time.perf_counter() - started)
                err.attempts = attempt
                # A write cut off by a bound was sent: it may have been applied.
                err.in_doubt = write
                raise
            except (httpx.ConnectTimeout, httpx.PoolTimeout):
                kind, sent = "timeout", False  # never reached the portal
            except httpx.TimeoutException:
                kind = "timeout"
            except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError) as err:
                tls = _tls_failure(err)
                if tls is not None:
                    self._notify(method, route, None, "tls", time.perf_counter() - started)
                    raise PortalTlsError(
                        f"portal {method} {path}: TLS failure ({tls}); not retried: check "
                        "the portal's certificate or the CA bundle",
                        method=method, path=path, kind="tls", attempts=attempt,
                    ) from None
                kind = "connection"  # refused, reset, or closed without an answer
                if isinstance(err, httpx.ConnectError):
                    sent = False  # refused: it never reached the portal
            except httpx.DecodingError as err:
                self._notify(method, route, None, "decoding", time.perf_counter() - started)
                raise PortalProtocolError(
                    f"portal {method} {path}: undecodable response body",
                    method=method, path=path, kind="decoding", attempts=attempt,
                ) from err
            except httpx.HTTPError as err:  # a bad URL or request: ours to fix
                self._notify(method, route, None, "request", time.perf_counter() - started)
                raise PortalRejected(
                    f"portal {method} {path}: request failed ({type(err).__name__})",
                    method=method, path=path, kind="request", attempts=attempt,
                ) from err
            else:
                status = response.status_code
                seconds = time.perf_counter() - started
                if 200 <= status < 300 or status in ok_statuses:
                    self._notify(method, route, status, None, seconds)
                    return response
                if status == 429:
                    kind = "rate_limited"
                    retry_after = _retry_after(response.headers.get("Retry-After"))
                elif status >= 500:
                    kind = "server_error"
                else:
                    self._notify(method, route, status, None, seconds)
                    raise PortalRejected(
                        f"portal {method} {path}: rejected with HTTP {status}"
                        f"{self._error_code(response)}",
                        method=method, path=path, kind="rejected", status=status,
                        attempts=attempt,
                    )
            self._notify(method, route, status, kind, time.perf_counter() - started)
            if write and sent and (status is None or status >= 500):
                # No answer, or a server error that may have come after the change was
                # made: sending it again would lean on the portal's idempotency.
                log.warning("portal_write_in_doubt", method=method, route=route, kind=kind,
                            status=status, attempts=attempt)
                what = f"HTTP {status}" if status is not None else kind
                raise PortalUnavailable(
                    f"portal {method} {path}: {what} after sending; not repeated (it may "
                    "have been applied)",
                    method=method, path=path, kind=kind, status=status, attempts=attempt,
                    in_doubt=True,
                )

            delay: float | None = None
            if attempt <= self.max_retries:
                if retry_after is not None:
                    delay = min(retry_after, retry_cap)
                else:
                    delay = self._rng.uniform(0, min(cap, base * 2 ** (attempt - 1)))
                if slept + delay > budget:
                    # Waiting less than the portal asked is pointless; jitter can shrink.
                    delay = None if retry_after is not None else max(0.0, budget - slept)
            if delay is None:
                log.warning("portal_unavailable", method=method, route=route, status=status,
                            kind=kind, attempts=attempt)
                raise PortalUnavailable(
                    f"portal {method} {path}: {kind}"
                    f"{f' (HTTP {status})' if status else ''} after {attempt} attempt(s)",
                    method=method, path=path, kind=kind, status=status, attempts=attempt,
                )
            log.info("portal_retry", method=method, route=route, status=status, kind=kind,
                     attempt=attempt, delay=round(delay, 3))
            self.call_stats.count_retry()
            self._sleep(delay)
            slept += delay

    def _bounded(self, method: str, path: str, params: Mapping[str, Any] | None,
                 json: Any, headers: Mapping[str, str] | None) -> httpx.Response:
        """One exchange within the bounds: at most `max_response_bytes` of body once
        decompressed (a gzip bomb stops at the cap, not at 1 GB), and all of it within
        `request_deadline` seconds. Per-read timeouts alone let a server that sends a
        byte every few seconds hold a scan forever, so the exchange runs in a thread of
        its own and is abandoned at the deadline (its reads stop at the next chunk)."""
        outcome: dict[str, Any] = {}
        abandoned = threading.Event()
        cap = self.max_response_bytes

        def exchange() -> None:
            try:
                request = self._client.build_request(
                    method, path, params=params, json=json, headers=headers,
                    timeout=self._timeout)
                response = self._client.send(request, stream=True)
                try:
                    body = _read_capped(response, cap, abandoned, method, path)
                finally:
                    response.close()
                if body is None:
                    return
                response._content = bytes(body)
                outcome["response"] = response
            except BaseException as err:  # handed to the caller's thread
                outcome["error"] = err

        worker = threading.Thread(target=exchange, name="portal-request", daemon=True)
        worker.start()
        worker.join(self.request_deadline)
        if worker.is_alive():
            abandoned.set()
            raise PortalLimitError(
                f"portal {method} {path}: no complete answer within "
                f"{self.request_deadline:g} s (portal_request_deadline_seconds)",
                method=method, path=path, kind="deadline")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["response"]

    @staticmethod
    def _error_code(response: httpx.Response) -> str:
        """The API's stable error code (never its message, which we do not control)."""
        try:
            code = response.json().get("error")
        except (ValueError, AttributeError):
            return ""
        return f" ({code})" if isinstance(code, str) and code.isidentifier() else ""

    def _json(self, response: httpx.Response, method: str, path: str) -> Any:
        try:
            return response.json()
        except (ValueError, UnicodeDecodeError) as err:
            raise PortalProtocolError(
                f"portal {method} {path}: response is not valid JSON",
                method=method, path=path, kind="malformed", status=response.status_code,
            ) from err

    # -- reading ------------------------------------------------------------------------

    def _item(self, table: str, item: Any, line: int) -> Any:
        """One JSON item -> record, or InvalidRecord naming what is wrong (no values)."""
        if not isinstance(item, dict):
            return InvalidRecord(table, line, "item is not a JSON object", table=table)
        row: dict[str, str | None] = {}
        wrong: list[str] = []
        for column in PORTAL_LAYOUT[table]:
            try:
                row[column] = _text(item.get(column))
            except TypeError:
                row[column] = None
                wrong.append(column)
        if wrong:
            return invalid(table, row, table, line, f"unexpected JSON type for {', '.join(wrong)}")
        return PARSERS[table](row, table, line)

    def _pages(
        self, route: str, path: str, params: Mapping[str, Any] | None
    ) -> Iterator[list[Any]]:
        """The raw items of each page; follows `next_cursor` to the end, since a short page
        does not mean the last one."""
        cursor: str | None = None
        seen: set[str] = set()
        pages = 0
        while True:
            pages += 1
            if pages > self.max_pages:
                raise PortalLimitError(
                    f"portal GET {path}: more than {self.max_pages} pages "
                    "(portal_max_pages); the listing does not end",
                    method="GET", path=path, kind="too_many_pages")
            query: dict[str, Any] = {**(params or {}), "limit": self.page_size}
            if cursor:
                query["cursor"] = cursor
            body = self._json(self._request("GET", route, path, params=query), "GET", path)
            items = body.get("items") if isinstance(body, dict) else None
            cursor = body.get("next_cursor") if isinstance(body, dict) else None
            if not isinstance(items, list) or not (cursor is None or isinstance(cursor, str)):
                raise PortalProtocolError(
                    f"portal GET {path}: not a page (items list and next_cursor expected)",
                    method="GET", path=path, kind="shape",
                )
            yield items
            if not cursor:
                return
            if cursor in seen:
                raise PortalProtocolError(
                    f"portal GET {path}: the same cursor came back twice",
                    method="GET", path=path, kind="cursor_loop",
                )
            seen.add(cursor)

    def _records(self, table: str, path: str, items: list[Any], line: int) -> list[Any]:
        """One page's items as records, numbered after `line`."""
        records = [self._item(table, item, line + n) for n, item in enumerate(items, 1)]
        if len(records) >= SCHEMA_DRIFT_MIN_ITEMS and all(
            isinstance(r, InvalidRecord) for r in records
        ):
            raise PortalProtocolError(
                f"portal GET {path}: no item of a {len(records)}-item page parses "
                f"(first problem: {records[0].reason})",
                method="GET", path=path, kind="shape",
            )
        return records

    def _paged(
        self, table: str, route: str, path: str, params: Mapping[str, Any] | None = None
    ) -> Iterator[Any]:
        line = 0
        for items in self._pages(route, path, params):
            yield from self._records(table, path, items, line)
            line += len(items)

    def _selected(
        self,
        table: str,
        path: str,
        selectors: Mapping[str, Collection[str]],
        changed_since: datetime | None = None,
    ) -> Iterator[Any]:
        """The rows matching any selector, read in batches of ids.

        A row matching ids of two batches comes back twice; it is yielded once. Identical
        rows come back together in every batch that matches them, so each distinct item
        is yielded as many times as the most any one batch returned it: the rows the
        portal holds, no more. Rows come in portal order within a batch, batch after
        batch; only two rows sharing an id (which the API treats as a key) but matched
        by different batches could come in another order than in a full read.
        """
        requests: list[dict[str, Any]] = list(_batches(selectors, self.select_batch))
        if changed_since is not None:
            if not requests:
                requests.append({})
            requests[0]["changed_since"] = _iso(changed_since)
        yielded: Counter[str] = Counter()
        line = 0
        for params in requests:
            returned: Counter[str] = Counter()
            for items in self._pages(path, path, params):
                fresh = []
                for item in items:
                    key = json.dumps(item, sort_keys=True)
                    returned[key] += 1
                    if returned[key] > yielded[key]:
                        yielded[key] += 1
                        fresh.append(item)
                yield from self._records(table, path, fresh, line)
                line += len(fresh)

    def users(self, since: datetime | None = None) -> Iterator[PortalUser | InvalidRecord]:
        params = {"updated_since": _iso(since)} if since is not None else None
        return self._paged("portal_users", "/users", "/users", params)

    def links(self) -> Iterator[CaregiverLink | InvalidRecord]:
        return self._paged("portal_links", "/links", "/links")

    def sources(self) -> Iterator[PortalSource | InvalidRecord]:
        return self._paged("portal_sources", "/sources", "/sources")

    # -- targeted reads (incremental scans): the same answers as PortalTables' --------

    def select_users(
        self,
        ids: Collection[str] = (),
        patient_ids: Collection[str] = (),
        contact_ids: Collection[str] = (),
        changed_since: datetime | None = None,
    ) -> Iterator[PortalUser | InvalidRecord]:
        """By id, by OP patient or contact, or changed since a time (with no readable
        `updated_at`: maybe changed): any of them."""
        return self._selected("portal_users", "/users", {
            "user_id": ids, "op_patient_id": patient_ids, "op_contact_id": contact_ids,
        }, changed_since)

    def select_links(self, user_ids: Collection[str]) -> Iterator[CaregiverLink | InvalidRecord]:
        """Links with either end among the users."""
        return self._selected("portal_links", "/links", {"user_id": user_ids})

    def select_sources(self, user_ids: Collection[str]) -> Iterator[PortalSource | InvalidRecord]:
        return self._selected("portal_sources", "/sources", {"user_id": user_ids})

    def audit(
        self, since: datetime | None = None, action: str | None = None
    ) -> Iterator[AuditEvent | InvalidRecord]:
        params: dict[str, str] = {}
        if since is not None:
            params["since"] = _iso(since)
        if action:
            params["action"] = action
        return self._paged("portal_audit", "/audit", "/audit", params)

    def caregivers(self, user_id: str) -> Iterator[CaregiverLink | InvalidRecord]:
        """Links in which the user is the dependent."""
        path = f"/users/{segment(user_id)}/caregivers"
        return self._paged("portal_links", "/users/{user_id}/caregivers", path)

    def dependents(self, user_id: str) -> Iterator[CaregiverLink | InvalidRecord]:
        """Links in which the user is the caregiver: what a refresh should have fixed."""
        path = f"/users/{segment(user_id)}/dependents"
        return self._paged("portal_links", "/users/{user_id}/dependents", path)

    def get_user(self, user_id: str) -> PortalUser | None:
        """A fresh read of one user (verification after a hold); None if there is none."""
        path = f"/users/{segment(user_id)}"
        response = self._request("GET", "/users/{user_id}", path, ok_statuses=frozenset({404}))
        if response.status_code == 404:
            return None
        body = self._json(response, "GET", path)
        row: dict[str, str | None] = {}
        if isinstance(body, dict):
            try:
                row = {c: _text(body.get(c)) for c in PORTAL_LAYOUT["portal_users"]}
            except TypeError:
                row = {}
        record = parse_portal_user(row, "portal_users", 1) if row else None
        if not isinstance(record, PortalUser):
            reason = record.reason if record is not None else "not a user object"
            raise PortalProtocolError(
                f"portal GET {path}: unreadable user ({reason})",
                method="GET", path=path, kind="shape", status=response.status_code,
            )
        return record

    # -- writing ------------------------------------------------------------------------

    def _write(self, method: str, route: str, path: str, idempotency_key: str | None,
               body: Any = None) -> dict[str, Any]:
        headers = {}
        if idempotency_key is not None:
            if not idempotency_key.strip():
                raise ValueError("idempotency_key must not be blank")
            headers["Idempotency-Key"] = idempotency_key
        response = self._request(method, route, path, json=body, headers=headers, write=True)
        if not response.content:
            return {}
        answer = self._json(response, method, path)
        return answer if isinstance(answer, dict) else {}

    def set_user_email(self, user_id: str, email: str, idempotency_key: str) -> None:
        path = f"/users/{segment(user_id)}"
        self._write("PATCH", "/users/{user_id}", path, idempotency_key, {"email": email})

    def refresh_source(self, user_id: str, idempotency_key: str) -> None:
        """Disconnect + connect in one call; the links follow OP after 10-20 minutes."""
        path = f"/users/{segment(user_id)}/source/refresh"
        self._write("POST", "/users/{user_id}/source/refresh", path, idempotency_key)

    def disconnect_source(self, user_id: str, idempotency_key: str | None = None) -> None:
        path = f"/users/{segment(user_id)}/source/disconnect"
        self._write("POST", "/users/{user_id}/source/disconnect", path, idempotency_key)

    def connect_source(self, user_id: str, idempotency_key: str | None = None) -> None:
        path = f"/users/{segment(user_id)}/source/connect"
        self._write("POST", "/users/{user_id}/source/connect", path, idempotency_key)

    def resend_welcome(self, contact_id: str, email: str, idempotency_key: str) -> None:
        """Register: the portal (re)sends the Welcome email; no user is created."""
        self._write("POST", "/welcome", "/welcome", idempotency_key,
                    {"op_contact_id": contact_id, "email": email})
