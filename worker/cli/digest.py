"""`oprecon digest`: preview the next digest, or send what is due without Celery.

`--preview` never writes: it reads the state database without migrating it (an absent
SQLite file is planned against an empty in-memory schema) and never claims a window.
`render_example()` regenerates docs/digest-example.html from seeded findings.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings, load_settings
from worker.digest import build as b
from worker.digest import render
from worker.digest.send import deliver, load_names, tick
from worker.state.models import DigestSent


def _groups(recipients: list[b.Recipient]) -> list[tuple[str, b.Recipient, int]]:
    """One preview per distinct set of categories (their digests only differ by history)."""
    seen: dict[tuple[str, frozenset[str]], tuple[b.Recipient, int]] = {}
    for r in recipients:
        k = (r.channel, r.categories)
        first, n = seen.get(k, (r, 0))
        seen[k] = (first, n + 1)
    out = []
    for (channel, cats), (first, n) in seen.items():
        label = "webhook" if channel == "webhook" else (
            " + ".join(sorted(cats)) + f" ({n} recipient{'s' if n != 1 else ''})")
        out.append((label, first, n))
    return out


def preview_digests(settings: Settings, sessions: sessionmaker[Session], now: datetime,
                    out: TextIO, html: Path | None) -> list[Path]:
    """Print the text part of the next daily digest per recipient group; maybe write HTML."""
    recipients = b.resolve_recipients(settings)
    if not recipients:
        out.write("No digest recipients are configured (OPRECON_DIGEST_RECIPIENTS): nothing "
                  "would be sent. Showing the digest every category would receive.\n\n")
        recipients = [b.Recipient("preview", "email", "", frozenset(b.CATEGORIES), "preview")]
    groups = _groups(recipients)
    due_window = b.latest_closed_daily(settings, now)
    names = load_names(settings, sessions, None)  # None unless digest_show_names
    written: list[Path] = []
    for i, (label, recipient, _) in enumerate(groups):
        with sessions() as session:
            # The next digest is the closed window if it has not gone out yet, else the
            # one that closes next (built from what the state database holds now).
            claimed = session.scalar(select(DigestSent.id).where(
                DigestSent.practice == settings.practice,
                DigestSent.recipient == recipient.key,
                DigestSent.window_key == due_window.key,
            ))
            target = b.next_daily(settings, now) if claimed else due_window
            who = names if recipient.channel == "email" else None
            digest = b.build_daily(session, settings, recipient, target, now, who)
            if not claimed and digest.is_empty:
                # Nothing for the closed window (a fresh deployment, say): show what the
                # next one will carry so far instead of an empty page.
                target = b.next_daily(settings, now)
                digest = b.build_daily(session, settings, recipient, target, now, who)
        empty = " (empty so far: nothing would be sent)" if digest.is_empty else ""
        when = target.end.astimezone(b.zone(settings)).strftime("%Y-%m-%d %H:%M %Z")
        out.write(f"===== {label}: {target.key}, goes out {when}{empty} =====\n")
        out.write(render.render_text(digest))
        out.write("\n")
        if html is not None:
            # FILE itself for the first group, FILE-2.html, ... for the others.
            path = html if i == 0 else html.with_name(
                f"{html.stem}-{i + 1}{html.suffix or '.html'}")
            path.write_text(render.render_html(digest), encoding="utf-8")
            written.append(path)
            out.write(f"HTML for {label} written to {path}\n")
    return written


def send_due(settings: Settings, sessions: sessionmaker[Session], now: datetime,
             out: TextIO) -> int:
    """Send everything due in this process (cron-less setups). Returns how many were sent."""
    labels = {r.key: r.label for r in b.resolve_recipients(settings)}
    sent = 0
    for recipient_key, window_key in tick(settings, sessions, now):
        result = deliver(settings, sessions, recipient_key, window_key, now=now, final=True)
        sent += result.status == "sent"
        why = f" ({result.reason})" if result.reason else ""
        if result.notices > 1:
            why += f" ({result.notices} notices in one message)"
        out.write(f"{window_key} → {labels.get(recipient_key, recipient_key)}: "
                  f"{result.status}{why}\n")
    if not sent:
        out.write("nothing sent\n")
    return sent


def send_test(settings: Settings, recipient: str, now: datetime, out: TextIO) -> None:
    """`digest --test RECIPIENT`: one short message now, through the configured relay or
    webhook, to a configured recipient (digests go to no one else). Nothing is recorded:
    it proves the channel, not a window. A failure is one line and exit status 2."""
    from email.message import EmailMessage

    from worker.cli.errors import CannotStart
    from worker.digest.send import (
        AmbiguousDeliveryError,
        PermanentDeliveryError,
        TransientDeliveryError,
        post_webhook,
        send_email,
    )

    recipients = b.resolve_recipients(settings)
    wanted = recipient.strip().lower()
    match = next((r for r in recipients if r.channel == wanted
                  or (r.channel == "email" and r.address.lower() == wanted)), None)
    if match is None:
        configured = ", ".join(r.label for r in recipients) or "none"
        raise CannotStart(f"{recipient} is not a configured digest recipient (configured: "
                          f"{configured}); a test goes only where digests go")
    stamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
    text = (f"This is a test from oprecon for practice {settings.practice}, sent {stamp} by "
            f"`oprecon digest --test`. Digests for {match.label} will arrive this way.")
    try:
        if match.channel == "webhook":
            post_webhook(match.address, {"text": f"[oprecon] test message: {text}"},
                         attempts=1)
            where = "the webhook"
        else:
            msg = EmailMessage()
            msg["Subject"] = f"[oprecon] test message for {settings.practice}"
            msg["From"] = settings.smtp_sender
            msg["To"] = match.address
            msg.set_content(text + "\n")
            send_email(settings, msg, match.address, attempts=1)
            where = f"SMTP {settings.smtp_host}:{settings.smtp_port}"
    except (TransientDeliveryError, PermanentDeliveryError, AmbiguousDeliveryError) as err:
        raise CannotStart(f"test message to {match.label} not sent: {err}") from None
    out.write(f"test message sent to {match.label} through {where}\n")


def digest_command(settings: Settings, *, preview: bool = False, html: Path | None = None,
                   test: str | None = None, now: datetime | None = None,
                   out: TextIO | None = None) -> None:
    from worker.scan.wiring import dry_run_sessions, state_sessions

    out = out or sys.stdout
    now = now or datetime.now(UTC)
    if test is not None:
        send_test(settings, test, now, out)
        return
    if preview:
        preview_digests(settings, dry_run_sessions(settings), now, out, html)
        return
    if html is not None:
        out.write("--html only applies with --preview\n")
    send_due(settings, state_sessions(settings), now, out)


# -- the committed example ---------------------------------------------------------------

EXAMPLE_NOW = datetime(2026, 11, 25, 12, 40, tzinfo=UTC)  # 07:40 in New York


def _example_sessions() -> sessionmaker[Session]:
    from alembic import command
    from sqlalchemy.pool import StaticPool

    from worker.state.db import alembic_config, make_engine, session_factory

    engine = make_engine("sqlite://", poolclass=StaticPool)
    with engine.begin() as conn:
        cfg = alembic_config("sqlite://")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return session_factory(engine)


def seed_example(sessions: sessionmaker[Session], practice: str, now: datetime) -> None:
    """A practice with one of most kinds of finding and state, ids only."""
    from worker.model.findings import fingerprint
    from worker.state.db import kv_set
    from worker.state.models import ActionRow, FindingRow

    day = timedelta(days=1)

    def row(check: str, severity: str, state: str, first: timedelta, detail: str, *,
            patient: str | None = None, contact: str | None = None, user: str | None = None,
            contacts: list[str] | None = None, changed: timedelta | None = None,
            resolved: timedelta | None = None, next_check: timedelta | None = None
            ) -> FindingRow:
        return FindingRow(
            practice=practice, check=check, severity=severity, state=state,
            fingerprint=fingerprint(check, patient, contact, user, contacts or ()),
            patient_id=patient, contact_id=contact, portal_user_id=user, contact_ids=contacts,
            detail=detail, first_seen_at=now - first, last_seen_at=now,
            state_changed_at=now - (changed if changed is not None else first),
            resolved_at=now - resolved if resolved is not None else None,
            next_check_at=now + next_check if next_check is not None else None,
        )

    rows = [
        row("authority_invalid", "warning", "open", timedelta(hours=5),
            "Mother on chart P10482 has authority None: no portal access and no Welcome email",
            patient="P10482", contact="C20931"),
        row("self_role", "warning", "open", 3 * day + timedelta(hours=2),
            "contact C20417 is a parent here and also patient P10077, whose chart lists them "
            "with Role/Reason Self: the Welcome email is never sent",
            patient="P10077", contact="C20417"),
        row("contact_duplicate", "warning", "open", timedelta(hours=9),
            "2 contact records look like one person (same first name, same last name, "
            "same email; match probability 0.94): C20118, C20877", contact="C20118",
            contacts=["C20118", "C20877"]),
        row("patient_email_present", "warning", "open", 14 * day + timedelta(hours=3),
            "chart P10990 is a dependent but holds an email address: it will not appear "
            "under the parent's portal account", patient="P10990"),
        row("contact_email_invalid", "info", "open", timedelta(hours=20),
            "contact C20555 is authorized on chart(s) P10311 but the email is not a valid "
            "address", contact="C20555"),
        row("caregiver_link_stale", "high", "held", timedelta(hours=2),
            "portal user U30912 (contact C20644) can still see patient P10455, whom OP no "
            "longer authorizes them for", patient="P10455", contact="C20644", user="U30912",
            changed=timedelta(minutes=10), next_check=timedelta(minutes=10)),
        row("caregiver_link_missing", "warning", "escalated", 2 * day,
            "contact C20301 (portal user U30301) is authorized on chart P10301 but the portal "
            "does not link them to dependent user U30302", patient="P10301", contact="C20301",
            user="U30301", changed=timedelta(hours=6)),
        row("portal_patient_role_invalid", "warning", "open", timedelta(hours=11),
            "portal user U30777 of patient P10777 has role Caregiver, not Patient",
            patient="P10777", user="U30777"),
        row("welcome_not_sent", "info", "pending", timedelta(minutes=5),
            "contact C20999 is authorized but has no portal account and no Welcome email in "
            "the window", contact="C20999"),
        row("contact_inactive", "warning", "silenced", 20 * day,
            "contact C20202 has Joint authority on chart P10202 but is inactive",
            patient="P10202", contact="C20202"),
        row("welcome_not_sent", "info", "open", timedelta(hours=1, minutes=5),
            "contact C20640 is authorized but has no portal account and no Welcome email in "
            "the window", patient="P10640", contact="C20640"),
        row("welcome_not_sent", "info", "resolved", 2 * day,
            "contact C20123 is authorized but has no portal account and no Welcome email in "
            "the window", contact="C20123", resolved=timedelta(hours=8)),
    ]
    staged = rows[-2]  # its resend is one of a batch the mass-change guard holds
    with sessions.begin() as session:
        session.add_all(rows)
        session.flush()
        staged_at = now - timedelta(hours=1)
        for i in range(64):  # a mass-change batch held back by the guard
            session.add(ActionRow(
                practice=practice, finding_id=staged.id, run_id=812, kind="resend_welcome",
                idempotency_key=f"example:staged:{i}", params={}, status="staged",
                created_at=staged_at))
        kv_set(session, practice, "guard", {
            "run_id": 812, "at": staged_at.isoformat(), "staged": 64, "status": "pending",
            "reason": "64 fixes (3.1% of 2040 patients) exceed the mass-change guard (50 fixes "
                      "/ 2%): batch staged for approval"}, now)
        yesterday = b.latest_closed_daily(_example_settings(practice), now - day)
        for rkey in (b.recipient_key("frontdesk@example.invalid"),
                     b.recipient_key("manager@example.invalid")):
            session.add(DigestSent(practice=practice, recipient=rkey, window_key=yesterday.key,
                                   channel="email", status="sent", created_at=yesterday.end,
                                   sent_at=yesterday.end, items=3))


def _example_settings(practice: str) -> Settings:
    return load_settings(
        practice=practice, digest_timezone="America/New_York", digest_time="07:30",
        digest_recipients={"front_desk": ["frontdesk@example.invalid"],
                           "practice_manager": ["manager@example.invalid"]},
    )


def render_example(path: Path | str, now: datetime = EXAMPLE_NOW) -> Path:
    """Write an HTML digest (both categories, ids only) built from seeded findings."""
    path = Path(path)
    settings = _example_settings("example-pediatrics")
    sessions = _example_sessions()
    seed_example(sessions, settings.practice, now)
    window = b.latest_closed_daily(settings, now)
    # Front desk's history, both categories' items: one page shows every kind of item.
    recipient = replace(b.resolve_recipients(settings)[0], categories=frozenset(b.CATEGORIES))
    with sessions() as session:
        digest = b.build_daily(session, settings, recipient, window, now)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render.render_html(digest), encoding="utf-8")
    return path


def render_demo_example(path: Path | str, workdir: Path | str) -> Path:
    """The HTML digest staff would get the morning after the demo practice's first day:
    run `oprecon demo` into `workdir`, pretend yesterday's digest went out, and render
    today's for one recipient of both categories (ids only)."""
    import contextlib
    import io

    from worker.devtools.demo import DEMO_MINUTES, PRACTICE, run_demo
    from worker.scan.wiring import state_sessions

    state = Path(workdir) / "demo.sqlite"
    generated = datetime.fromisoformat(
        json.loads((PRACTICE / "generator.json").read_text(encoding="utf-8"))["now"])
    with contextlib.redirect_stdout(io.StringIO()):
        # In the practice's own time (not ending now), so the example is the same each day.
        run_demo(state_db=state, end=generated + timedelta(minutes=DEMO_MINUTES))
    settings = load_settings(
        state_db_url=f"sqlite:///{state}", digest_timezone="America/New_York",
        digest_time="07:30", digest_recipients={"front_desk": ["frontdesk@example.invalid"]},
    )
    now = datetime(2026, 11, 3, 13, 0, tzinfo=UTC)  # the demo practice's next morning
    sessions = state_sessions(settings)
    window = b.latest_closed_daily(settings, now)
    previous = b.latest_closed_daily(settings, now - timedelta(days=1))
    recipient = replace(b.resolve_recipients(settings)[0], categories=frozenset(b.CATEGORIES))
    with sessions.begin() as session:
        session.add(DigestSent(practice=settings.practice, recipient=recipient.key,
                               window_key=previous.key, channel="email", status="sent",
                               created_at=previous.end, sent_at=previous.end, items=0))
    with sessions() as session:
        digest = b.build_daily(session, settings, recipient, window, now)
    path = Path(path)
    path.write_text(render.render_html(digest), encoding="utf-8")
    return path


if __name__ == "__main__":  # python -m worker.cli.digest docs/digest-example.html
    if len(sys.argv) > 2 and sys.argv[1] == "--demo":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            print(render_demo_example(sys.argv[2], tmp))
    else:
        print(render_example(sys.argv[1] if len(sys.argv) > 1 else "docs/digest-example.html"))
