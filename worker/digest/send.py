"""Deliver digests at most once per (recipient, window), by email or webhook.

The `digests_sent` row is committed (status `sending`) before anything leaves; its
unique constraint is what makes a Celery retry, a redelivered message or two racing
workers send one message between them. See `worker.digest` for every status.
"""

from __future__ import annotations

import email.policy
import smtplib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import httpx
import structlog
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from worker.digest import build as b
from worker.digest import render
from worker.logging import scrub_text
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


def _finish(sessions: sessionmaker[Session], row_id: int, status: str, *,
            items: int = 0, sent_at: datetime | None = None, error: str | None = None) -> None:
    with sessions.begin() as session:
        row = session.get(DigestSent, row_id)
        assert row is not None
        row.status = status
        row.items = items
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


def due(settings: Settings, sessions: sessionmaker[Session],
        now: datetime | None = None) -> list[tuple[str, str]]:
    """(recipient key, window key) pairs with no `digests_sent` row yet: immediate first."""
    now = now or datetime.now(UTC)
    recipients = b.resolve_recipients(settings)
    if not recipients:
        return []
    daily = b.latest_closed_daily(settings, now)
    with sessions() as session:
        notices = b.immediate_notices(session, settings, now)
        keys = {daily.key} | {n.window_key for n in notices}
        done = set(session.execute(
            select(DigestSent.recipient, DigestSent.window_key).where(
                DigestSent.practice == settings.practice, DigestSent.window_key.in_(keys))
        ).tuples())
    out: list[tuple[str, str]] = []
    for r in recipients:
        for n in notices:
            if n.category in r.categories and (r.key, n.window_key) not in done:
                out.append((r.key, n.window_key))
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
    from worker.wiring import op_reader

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
    `final` is false (the caller will retry); otherwise every outcome is a status."""
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
    row_id = claim(sessions, settings.practice, recipient.key, window.key, recipient.channel,
                   now)
    if row_id is None:
        bound.info("digest_already_claimed")
        return Delivery("duplicate", reason="already sent or being sent")
    sending = False
    try:
        names = load_names(settings, sessions, names_loader) if recipient.channel == "email" \
            else None
        with sessions() as session:
            digest = b.build(session, settings, recipient, window, now, names)
        if digest is None:
            _finish(sessions, row_id, "skipped", error="cleared before it was sent")
            bound.info("digest_skipped_cleared")
            return Delivery("skipped", reason="cleared before it was sent")
        if digest.is_empty:
            _finish(sessions, row_id, "empty")
            bound.info("digest_empty")
            return Delivery("empty")
        sending = True
        if recipient.channel == "webhook":
            post_webhook(recipient.address, render.webhook_body(digest), sleep=sleep)
        else:
            msg = render.build_message(digest, settings.smtp_sender, recipient.address,
                                       recipient.key)
            send_email(settings, msg, recipient.address, sleep=sleep)
    except TransientDeliveryError as err:
        if final:
            _finish(sessions, row_id, "failed", error=str(err))
            bound.error("digest_failed", reason=str(err), retries_left=False)
            return Delivery("failed", reason=str(err))
        _finish(sessions, row_id, "retrying", error=str(err))
        bound.warning("digest_retrying", reason=str(err))
        raise
    except AmbiguousDeliveryError as err:
        _finish(sessions, row_id, "unknown", error=str(err))
        bound.error("digest_unknown", reason=str(err))
        return Delivery("unknown", reason=str(err))
    except PermanentDeliveryError as err:
        _finish(sessions, row_id, "failed", error=str(err))
        bound.error("digest_failed", reason=str(err))
        return Delivery("failed", reason=str(err))
    except BaseException as err:
        # A crash while handing the message over (a time limit, a bug) may have sent it.
        status = "unknown" if sending else "failed"
        _finish(sessions, row_id, status, error=f"{type(err).__name__}: {err}")
        bound.exception("digest_crashed", status=status)
        raise
    _finish(sessions, row_id, "sent", items=digest.items, sent_at=now)
    if window.ref == "deadman":
        with sessions.begin() as session:
            b.mark_deadman_alerted(session, settings.practice, window.detail, now)
    bound.info("digest_sent", items=digest.items, kind=digest.kind, backlog=digest.backlog)
    return Delivery("sent", items=digest.items)


__all__ = [
    "AmbiguousDeliveryError", "Delivery", "PermanentDeliveryError", "TransientDeliveryError",
    "claim", "deliver", "due", "expire_stale", "post_webhook", "send_email", "tick",
]

