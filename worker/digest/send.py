"""Deliver digests at most once per (recipient, window), by email or webhook.

The `digests_sent` row is committed (status `sending`) before anything leaves; its
unique constraint is what makes a Celery retry, a redelivered message or two racing
workers send one message between them. Immediate notices waiting for one recipient go
out together: every notice row of the bundle is claimed in one transaction, so each
notice still has exactly one row and one message. See `worker.digest` for every status.
"""

from __future__ import annotations

import email.policy
import smtplib
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import httpx
import structlog
from sqlalchemy import Insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from worker.digest import build as b
from worker.digest import render
from worker.model.text import scrub_text
from worker.state.models import DigestSent

log = structlog.get_logger(__name__)

STALE_AFTER = timedelta(hours=1)  # > the deliver task's whole retry span (~35 min)
SMTP_TIMEOUT = 30.0
WEBHOOK_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
ATTEMPTS = 3  # in-process tries per delivery; Celery retries on top with longer waits
BACKOFF = 2.0

Sleep = Callable[[float], None]
# CRLF line ends (smtplib sends bytes as they are); headers fold at 160, not 78, because
# the stdlib folds a long subject as "Subject:" + newline, which clients show with a
# leading blank. 160 is far below the 998 hard limit of RFC 5322.
WIRE = email.policy.SMTP.clone(max_line_length=160)


class TransientDeliveryError(Exception):
    """Not delivered, and worth another try later (4xx, connection refused, 5xx webhook)."""


class PermanentDeliveryError(Exception):
    """Not delivered, and trying again will not help (5xx SMTP reply, 4xx webhook)."""


class AmbiguousDeliveryError(Exception):
    """The message was handed over but no answer came back: it may have arrived."""


# -- channels --------------------------------------------------------------------------


def _smtp_once(settings: Settings, msg: EmailMessage, to: str) -> None:
    """One SMTP conversation. Only a failure after DATA was sent is ambiguous."""
    phase = "connect"
    try:
        cafile = str(settings.smtp_ca_file) if settings.smtp_ca_file else None
        tls = ssl.create_default_context(cafile=cafile)
        smtp = (
            smtplib.SMTP_SSL(settings.smtp_host, settings.smtp_port, timeout=SMTP_TIMEOUT,
                             context=tls)
            if settings.smtp_ssl
            else smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=SMTP_TIMEOUT)
        )
        with smtp:
            smtp.ehlo()
            if settings.smtp_starttls and not settings.smtp_ssl:
                smtp.starttls(context=tls)
                smtp.ehlo()
            if settings.smtp_user:
                password = (settings.smtp_password.get_secret_value()
                            if settings.smtp_password else "")
                smtp.login(settings.smtp_user, password)
            phase = "envelope"
            code, reply = smtp.mail(settings.smtp_sender)
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, reply, settings.smtp_sender)
            code, reply = smtp.rcpt(to)
            if code not in (250, 251):
                raise smtplib.SMTPRecipientsRefused({to: (code, reply)})
            phase = "data"
            code, reply = smtp.data(msg.as_bytes(policy=WIRE))
            if code != 250:
                raise smtplib.SMTPDataError(code, reply)
            phase = "done"
    except smtplib.SMTPRecipientsRefused as err:
        codes = [c for c, _ in err.recipients.values()]
        if codes and all(400 <= c < 500 for c in codes):
            raise TransientDeliveryError(f"recipient deferred ({codes[0]})") from err
        raise PermanentDeliveryError(f"recipient refused ({codes[0] if codes else '?'})") from err
    except smtplib.SMTPResponseException as err:
        if phase == "done":
            return  # the message was accepted; only the QUIT reply was odd
        text = f"SMTP {err.smtp_code} during {phase}"
        if 400 <= err.smtp_code < 500:
            raise TransientDeliveryError(text) from err
        raise PermanentDeliveryError(text) from err
    except ssl.SSLError as err:
        if phase == "done":
            return
        if phase == "data":
            raise AmbiguousDeliveryError(f"TLS broke while sending ({type(err).__name__})") from err
        # A certificate or protocol mismatch does not fix itself between retries.
        raise PermanentDeliveryError(f"TLS failed during {phase}: {type(err).__name__}") from err
    except (smtplib.SMTPServerDisconnected, OSError) as err:
        if phase == "done":
            return  # accepted before the connection dropped
        if phase == "data":
            raise AmbiguousDeliveryError(
                f"connection lost after the message was sent ({type(err).__name__})") from err
        raise TransientDeliveryError(f"{type(err).__name__} during {phase}") from err
    except smtplib.SMTPException as err:
        raise PermanentDeliveryError(f"{type(err).__name__} during {phase}") from err


def send_email(settings: Settings, msg: EmailMessage, to: str, *, sleep: Sleep = time.sleep,
               attempts: int = ATTEMPTS) -> None:
    """SMTP with STARTTLS/login as configured; transient failures retried with backoff."""
    for attempt in range(1, attempts + 1):
        try:
            _smtp_once(settings, msg, to)
            return
        except TransientDeliveryError as err:
            if attempt == attempts:
                raise
            log.info("digest_smtp_retry", attempt=attempt, reason=str(err))
            sleep(BACKOFF * 2 ** (attempt - 1))


def post_webhook(url: str, body: dict[str, Any], *, sleep: Sleep = time.sleep,
                 attempts: int = ATTEMPTS) -> None:
    """POST the JSON body; connection failures, 429 and 5xx are retried with backoff."""
    for attempt in range(1, attempts + 1):
        try:
            try:
                response = httpx.post(url, json=body, timeout=WEBHOOK_TIMEOUT)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout,
                    httpx.WriteTimeout) as err:
                raise TransientDeliveryError(f"webhook {type(err).__name__}") from err
            except httpx.TransportError as err:  # read timeout, dropped mid-response
                raise AmbiguousDeliveryError(f"webhook {type(err).__name__}") from err
            code = response.status_code
            if code == 429 or code >= 500:
                raise TransientDeliveryError(f"webhook HTTP {code}")
            if code >= 400:
                raise PermanentDeliveryError(f"webhook HTTP {code}")
            return
        except TransientDeliveryError as err:
            if attempt == attempts:
                raise
            log.info("digest_webhook_retry", attempt=attempt, reason=str(err))
            sleep(BACKOFF * 2 ** (attempt - 1))


# -- bookkeeping -----------------------------------------------------------------------


def claim(sessions: sessionmaker[Session], practice: str, recipient: str, window_key: str,
          channel: str, now: datetime) -> int | None:
    """Insert the `sending` row, or take over a `retrying` one; None if someone else has it."""
    try:
        with sessions.begin() as session:
            row = DigestSent(practice=practice, recipient=recipient, window_key=window_key,
                             channel=channel, status="sending", created_at=now)
            session.add(row)
            session.flush()
            return row.id
    except IntegrityError:
        pass
    with sessions.begin() as session:
        took = session.execute(
            update(DigestSent)
            .where(DigestSent.practice == practice, DigestSent.recipient == recipient,
                   DigestSent.window_key == window_key, DigestSent.status == "retrying")
            .values(status="sending")
        )
        if took.rowcount != 1:  # type: ignore[attr-defined]
            return None
        return session.scalar(
            select(DigestSent.id).where(
                DigestSent.practice == practice, DigestSent.recipient == recipient,
                DigestSent.window_key == window_key,
            )
        )


def _insert_unless_taken(session: Session) -> Insert:
    """INSERT that does nothing when the (practice, recipient, window) row exists.

    No savepoints: with pysqlite a savepoint opened first in a transaction commits
    on release, which would split a bundle's claim into several transactions.
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(DigestSent).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(DigestSent).on_conflict_do_nothing()
    raise RuntimeError(f"the state database must be PostgreSQL or SQLite, not {dialect}")


def claim_many(sessions: sessionmaker[Session], practice: str, recipient: str,
               window_keys: Iterable[str], channel: str, now: datetime) -> dict[str, int]:
    """Claim every key nobody else holds, in one transaction: window key → row id.

    Like `claim` per key (a new `sending` row, or a `retrying` one taken over); a key
    another worker holds is left out. Keys go in sorted order, so two workers claiming
    overlapping sets on PostgreSQL wait for each other instead of deadlocking.
    """
    claimed: dict[str, int] = {}
    with sessions.begin() as session:
        insert = _insert_unless_taken(session)
        for key in sorted(set(window_keys)):
            row_id = session.scalar(
                insert.values(practice=practice, recipient=recipient, window_key=key,
                              channel=channel, status="sending", created_at=now, items=0)
                .returning(DigestSent.id)
            )
            if row_id is None:
                row_id = session.scalar(
                    update(DigestSent)
                    .where(DigestSent.practice == practice, DigestSent.recipient == recipient,
                           DigestSent.window_key == key, DigestSent.status == "retrying")
                    .values(status="sending")
                    .returning(DigestSent.id)
                )
            if row_id is not None:
                claimed[key] = row_id
    return claimed


def _finish(sessions: sessionmaker[Session], rows: Mapping[int, int] | Iterable[int],
            status: str, *, sent_at: datetime | None = None,
            error: str | None = None) -> None:
    """Record the outcome of claimed rows (row id → items, or just ids: 0 items)."""
    items = rows if isinstance(rows, Mapping) else dict.fromkeys(rows, 0)
    with sessions.begin() as session:
        for row_id, count in items.items():
            row = session.get(DigestSent, row_id)
            assert row is not None
            row.status = status
            row.items = count
            row.sent_at = sent_at
            row.error = scrub_text(error)[:500] if error else None


def expire_stale(sessions: sessionmaker[Session], practice: str, now: datetime) -> int:
    """Rows a dead worker left behind become visible outcomes; nothing is resent."""
    cutoff = now - STALE_AFTER
    with sessions.begin() as session:
        unknown = session.execute(
            update(DigestSent)
            .where(DigestSent.practice == practice, DigestSent.status == "sending",
                   DigestSent.created_at < cutoff)
            .values(status="unknown",
                    error="the worker stopped while sending: it may or may not have arrived; "
                          "not resent")
        ).rowcount  # type: ignore[attr-defined]
        failed = session.execute(
            update(DigestSent)
            .where(DigestSent.practice == practice, DigestSent.status == "retrying",
                   DigestSent.created_at < cutoff)
            .values(status="failed")
        ).rowcount  # type: ignore[attr-defined]
    if unknown or failed:
        log.warning("digest_rows_expired", unknown=unknown, failed=failed)
    return int(unknown or 0) + int(failed or 0)


# -- what is due, and delivering one ---------------------------------------------------


KEYS_PER_QUERY = 500  # far below SQLite's and PostgreSQL's bound-parameter limits


def _rows_for(session: Session, practice: str, keys: Iterable[str]) -> set[tuple[str, str]]:
    """(recipient, window key) of every row for these keys, asked in chunks: a mass
    event can mean thousands of notices."""
    wanted = sorted(set(keys))
    found: set[tuple[str, str]] = set()
    for i in range(0, len(wanted), KEYS_PER_QUERY):
        found.update(session.execute(
            select(DigestSent.recipient, DigestSent.window_key).where(
                DigestSent.practice == practice,
                DigestSent.window_key.in_(wanted[i:i + KEYS_PER_QUERY]))
        ).tuples())
    return found


def due(settings: Settings, sessions: sessionmaker[Session],
        now: datetime | None = None) -> list[tuple[str, str]]:
    """(recipient key, window key) pairs to deliver, immediate first.

    One pair per recipient covers all of its immediate notices without a row: it names
    the oldest, and delivering it gathers the others into the same message.
    """
    now = now or datetime.now(UTC)
    recipients = b.resolve_recipients(settings)
    if not recipients:
        return []
    daily = b.latest_closed_daily(settings, now)
    with sessions() as session:
        notices = b.immediate_notices(session, settings, now)
        keys = {daily.key} | {n.window_key for n in notices}
        done = _rows_for(session, settings.practice, keys)
    out: list[tuple[str, str]] = []
    for r in recipients:
        waiting = [n.window_key for n in notices
                   if n.category in r.categories and (r.key, n.window_key) not in done]
        if waiting:  # notices are sorted oldest first
            out.append((r.key, waiting[0]))
    for r in recipients:
        if (r.key, daily.key) not in done:
            out.append((r.key, daily.key))
    return out


def tick(settings: Settings, sessions: sessionmaker[Session],
         now: datetime | None = None) -> list[tuple[str, str]]:
    """What the periodic task does: expire stale rows, then list what to enqueue."""
    now = now or datetime.now(UTC)
    expire_stale(sessions, settings.practice, now)
    return due(settings, sessions, now)


NamesLoader = Callable[[set[str], set[str]], dict[str, str]]


def names_from_op(op: Any) -> NamesLoader:
    """Names for the given ids only, streamed from an OP reader (never kept in bulk)."""
    def load(patient_ids: set[str], contact_ids: set[str]) -> dict[str, str]:
        names: dict[str, str] = {}
        for p in op.patients():
            pid = getattr(p, "patient_id", None)
            if pid in patient_ids and hasattr(p, "first_name"):
                names[f"patient:{pid}"] = f"{p.first_name} {p.last_name}".strip()
        for c in op.contacts():
            cid = getattr(c, "contact_id", None)
            if cid in contact_ids and hasattr(c, "first_name"):
                names[f"contact:{cid}"] = f"{c.first_name} {c.last_name}".strip()
        return names

    return load


def _default_names(settings: Settings) -> NamesLoader:
    from worker.scan.wiring import op_reader

    return names_from_op(op_reader(settings))


def load_names(settings: Settings, sessions: sessionmaker[Session],
               loader: NamesLoader | None) -> dict[str, str] | None:
    """Names only when configured; a source that cannot be read means ids, not no digest."""
    if not settings.digest_show_names:
        return None
    try:
        with sessions() as session:
            patients, contacts = b.mentioned_ids(session, settings.practice)
        if not (patients or contacts):
            return {}
        return (loader or _default_names(settings))(patients, contacts)
    except Exception as err:  # noqa: BLE001 — any source failure: fall back to ids
        log.warning("digest_names_unavailable", error=type(err).__name__)
        return None


@dataclass
class Delivery:
    status: str  # sent | empty | skipped | duplicate | retrying | failed | unknown
    items: int = 0
    reason: str = ""
    notices: int = 0  # immediate: how many notices this one message answered


def bundle_keys(session: Session, settings: Settings, recipient: b.Recipient, lead: str,
                now: datetime) -> list[str]:
    """What one immediate delivery tries to claim for `recipient`.

    The notice it was asked for, every other notice of the recipient's categories that
    has no row yet, and any of its notices an earlier attempt left `retrying` (their own
    retry then finds them taken and sends nothing). Oldest event first: the message
    lists them in this order.
    """
    practice = settings.practice
    notices = [n.window_key for n in b.immediate_notices(session, settings, now)
               if n.category in recipient.categories]
    have = {k for r, k in _rows_for(session, practice, notices) if r == recipient.key}
    retrying = session.scalars(select(DigestSent.window_key).where(
        DigestSent.practice == practice, DigestSent.recipient == recipient.key,
        DigestSent.window_key.like("immediate:%"), DigestSent.status == "retrying"))
    waiting = [k for k in notices if k not in have]
    return list(dict.fromkeys([*waiting, lead, *sorted(retrying)]))


def _transmit(settings: Settings, recipient: b.Recipient, digest: b.Digest,
              sleep: Sleep) -> None:
    if recipient.channel == "webhook":
        post_webhook(recipient.address, render.webhook_body(digest), sleep=sleep)
    else:
        msg = render.build_message(digest, settings.smtp_sender, recipient.address,
                                   recipient.key)
        send_email(settings, msg, recipient.address, sleep=sleep)


def deliver(
    settings: Settings,
    sessions: sessionmaker[Session],
    recipient_key: str,
    window_key: str,
    *,
    now: datetime | None = None,
    final: bool = True,
    names_loader: NamesLoader | None = None,
    sleep: Sleep = time.sleep,
) -> Delivery:
    """Send one (recipient, window) at most once. Raises TransientDeliveryError only when
    `final` is false (the caller will retry); otherwise every outcome is a status.

    An immediate window brings along the recipient's other waiting notices (see
    `bundle_keys`): all of them are claimed in one transaction and sent as one message.
    """
    now = now or datetime.now(UTC)
    bound = log.bind(recipient_key=recipient_key, window_key=window_key)
    recipient = b.find_recipient(settings, recipient_key)
    if recipient is None:
        bound.warning("digest_recipient_gone")
        return Delivery("skipped", reason="recipient no longer configured")
    try:
        window = b.parse_window(window_key, settings)
    except ValueError:
        bound.warning("digest_bad_window")
        return Delivery("skipped", reason="bad window key")
    bound = bound.bind(categories=sorted(recipient.categories), channel=recipient.channel)
    if window.kind == "immediate":
        with sessions() as session:
            keys = bundle_keys(session, settings, recipient, window.key, now)
        got = claim_many(sessions, settings.practice, recipient.key, keys,
                         recipient.channel, now)
        claimed = {k: got[k] for k in keys if k in got}
    else:
        row_id = claim(sessions, settings.practice, recipient.key, window.key,
                       recipient.channel, now)
        claimed = {window.key: row_id} if row_id is not None else {}
    if not claimed:
        bound.info("digest_already_claimed")
        return Delivery("duplicate", reason="already sent or being sent")
    return _deliver_claimed(settings, sessions, recipient, claimed, now=now, final=final,
                            names_loader=names_loader, sleep=sleep, bound=bound)


def _deliver_claimed(
    settings: Settings,
    sessions: sessionmaker[Session],
    recipient: b.Recipient,
    claimed: dict[str, int],
    *,
    now: datetime,
    final: bool,
    names_loader: NamesLoader | None,
    sleep: Sleep,
    bound: Any,
) -> Delivery:
    """Build, send and record what this worker claimed (window key → row id, in the
    order the message lists them)."""
    pending = dict(claimed)  # rows without an outcome yet
    sending = False
    try:
        names = load_names(settings, sessions, names_loader) if recipient.channel == "email" \
            else None
        windows: dict[str, b.Window] = {}
        bad: list[str] = []
        for key in pending:
            try:
                windows[key] = b.parse_window(key, settings)
            except ValueError:
                bad.append(key)
        if bad:
            _finish(sessions, [pending.pop(k) for k in bad], "skipped", error="bad window key")
            bound.warning("digest_bad_window", count=len(bad))
        with sessions() as session:
            built = {key: b.build(session, settings, recipient, windows[key], now, names)
                     for key in pending}
        cleared = [key for key, part in built.items() if part is None]
        if cleared:
            _finish(sessions, [pending.pop(k) for k in cleared], "skipped",
                    error="cleared before it was sent")
            bound.info("digest_skipped_cleared", notices=len(cleared))
        parts = {key: part for key, part in built.items() if part is not None}
        if not parts:
            return Delivery("skipped", reason="cleared before it was sent")
        # One part (a daily digest, a lone notice) comes back unchanged.
        digest = b.bundle_immediate(list(parts.values()), settings.immediate_bundle_max_items)
        if digest.is_empty:
            _finish(sessions, pending.values(), "empty")
            bound.info("digest_empty")
            return Delivery("empty")
        sending = True
        _transmit(settings, recipient, digest, sleep)
    except TransientDeliveryError as err:
        if final:
            _finish(sessions, pending.values(), "failed", error=str(err))
            bound.error("digest_failed", reason=str(err), retries_left=False)
            return Delivery("failed", reason=str(err))
        _finish(sessions, pending.values(), "retrying", error=str(err))
        bound.warning("digest_retrying", reason=str(err))
        raise
    except AmbiguousDeliveryError as err:
        _finish(sessions, pending.values(), "unknown", error=str(err))
        bound.error("digest_unknown", reason=str(err))
        return Delivery("unknown", reason=str(err))
    except PermanentDeliveryError as err:
        _finish(sessions, pending.values(), "failed", error=str(err))
        bound.error("digest_failed", reason=str(err))
        return Delivery("failed", reason=str(err))
    except BaseException as err:
        # A crash while handing the message over (a time limit, a bug) may have sent it.
        status = "unknown" if sending else "failed"
        _finish(sessions, pending.values(), status, error=f"{type(err).__name__}: {err}")
        bound.exception("digest_crashed", status=status)
        raise
    _finish(sessions, {pending[k]: part.items for k, part in parts.items()}, "sent",
            sent_at=now)
    for key, window in windows.items():
        if key in parts and window.ref == "deadman":
            with sessions.begin() as session:
                b.mark_deadman_alerted(session, settings.practice, window.detail, now)
    notices = len(parts) if digest.kind == "immediate" else 0
    bound.info("digest_sent", items=digest.items, kind=digest.kind, backlog=digest.backlog,
               notices=notices)
    return Delivery("sent", items=digest.items, notices=notices)


__all__ = [
    "AmbiguousDeliveryError", "Delivery", "PermanentDeliveryError", "TransientDeliveryError",
    "bundle_keys", "claim", "claim_many", "deliver", "due", "expire_stale", "post_webhook",
    "send_email", "tick",
]

