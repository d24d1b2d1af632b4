"""Turn a `Digest` into what people read: subject, text, HTML, a MIME message, a webhook body.

Templates live in `worker/digest/templates/` (package data). HTML is autoescaped, so a detail
or a name holding `<` or `&` can never change the markup; the text template is not.
"""

from __future__ import annotations

import hashlib
from email.message import EmailMessage
from email.utils import format_datetime
from functools import lru_cache
from typing import Any

import jinja2

from worker.digest.build import Digest, StepSet
from worker.model.text import clean_multiline, strip_controls

CATEGORY_NAMES = {"front_desk": "front desk", "practice_manager": "practice manager"}


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("worker.digest", "templates"),
        autoescape=lambda name: bool(name and name.endswith(".html.j2")),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["plural"] = lambda n, word, many=None: (
        f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"
    )
    return env


def _audience(digest: Digest) -> str:
    names = [CATEGORY_NAMES.get(c, c) for c in sorted(digest.categories)]
    return " and ".join(names) if names else "everyone"


def subject(digest: Digest) -> str:
    """Short, id-only subjects: they show in lock screens and notification previews.
    One line without control characters, whatever the ids hold: a CR/LF in a header
    would make the mail library refuse the message (or, worse, add a header)."""
    return strip_controls(_subject(digest))


def _subject(digest: Digest) -> str:
    if digest.kind == "immediate":
        if digest.bundled:
            return _bundle_subject(digest)
        if digest.notes:
            tag = "All clear" if digest.notes[0].kind == "deadman_clear" else (
                "Action needed now")
            return f"[oprecon] {tag}: {digest.notes[0].title}"
        group = digest.groups[0]
        item = group.items[0]
        tag = "Escalated" if item.escalated else "Action needed now"
        ref = item.who[0].split(" (")[0] if item.who else item.fingerprint
        return f"[oprecon] {tag}: {group.title} ({ref})"
    day = digest.window.day.isoformat() if digest.window.day else digest.window.key
    if digest.backlog:
        return (f"[oprecon] {digest.practice}: first report {day}, "
                f"{digest.counts.open_total} open item(s)")
    c = digest.counts
    return (f"[oprecon] {digest.practice}: daily digest {day}: {c.new} new, "
            f"{c.open_total} open, {c.resolved} resolved")


def _bundle_subject(digest: Digest) -> str:
    """How many problems, and of what kind: the preview must say it is not just one."""
    rows = digest.summary
    escalations_only = not digest.notes and all(r.escalated == r.count for r in rows)
    tag = "Escalated" if escalations_only else "Action needed now"
    others = len(rows) - 1
    tail = f" and {others} other kind{'s' if others != 1 else ''}" if others > 0 else ""
    return f"[oprecon] {tag}: {digest.items} problems ({rows[0].title}{tail})"


def _context(digest: Digest) -> dict[str, Any]:
    return {
        "d": digest,
        "c": digest.counts,
        "subject": subject(digest),
        "audience": _audience(digest),
        "window_end": digest.local(digest.window.end) if digest.kind == "daily" else "",
        "window_start": digest.local(digest.start) if digest.start else "",
        "generated": digest.local(digest.generated_at),
    }


def render_text(digest: Digest) -> str:
    return clean_multiline(environment().get_template("digest.txt.j2").render(_context(digest)))


def render_html(digest: Digest) -> str:
    return clean_multiline(environment().get_template("digest.html.j2").render(_context(digest)))


def message_id(recipient_key: str, window_key: str, domain: str) -> str:
    """Deterministic per (recipient, window): a mail system that sees it twice may drop one."""
    token = hashlib.sha256(f"{recipient_key}|{window_key}".encode()).hexdigest()[:32]
    return f"<{token}@{domain}>"


def _message_key(digest: Digest) -> str:
    """A bundle is identified by all of its notices, so a different set never shares an id."""
    if digest.bundled:
        return "bundle:" + ",".join(sorted(digest.notice_keys))
    return digest.window.key


def build_message(digest: Digest, sender: str, to: str, recipient_key: str) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = subject(digest)
    msg["From"] = sender
    msg["To"] = to
    msg["Date"] = format_datetime(digest.generated_at)
    domain = sender.rpartition("@")[2] or "oprecon.invalid"
    msg["Message-ID"] = message_id(recipient_key, _message_key(digest), domain)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies
    msg["X-Oprecon-Window"] = digest.window.key
    if digest.bundled:
        msg["X-Oprecon-Notices"] = str(len(digest.notice_keys))
    msg.set_content(render_text(digest))
    msg.add_alternative(render_html(digest), subtype="html")
    return msg


def _slack(text: str) -> str:
    text = clean_multiline(text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": _slack(text)[:2900]}}


def webhook_body(digest: Digest) -> dict[str, Any]:
    """A body Slack and Teams incoming webhooks both accept: `text`, plus Slack blocks.

    Slack caps a section at 3000 characters and a message at 50 blocks, hence the cuts.
    """
    c = digest.counts
    summary = (
        f"{c.new} new, {c.still_open} still open (oldest {c.oldest_days} days), "
        f"{c.resolved} resolved, {c.escalated} escalated, {c.waiting} waiting on the portal "
        f"delay, {c.silenced} silenced"
    )
    lines = [subject(digest)]
    if digest.kind == "daily":
        lines.append(summary)
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": subject(digest)[:150]}},
    ]
    if digest.kind == "daily":
        blocks.append(_section(summary))
    if digest.previous_issue:
        lines.append(f"Note: {digest.previous_issue}")
        blocks.append(_section(f"Note: {digest.previous_issue}"))
    for note in digest.notes:
        text = f"*{note.title}*\n{note.text}\n" + "\n".join(
            f"{i}. {s}" for i, s in enumerate(note.steps, 1))
        lines.append(f"{note.title}: {note.text}")
        blocks.append(_section(text))
    for row in digest.backlog_rows:
        text = (f"*{row.title}* (`{row.check}`): {row.count} open, e.g. "
                + "; ".join(row.examples))
        lines.append(f"{row.title}: {row.count} open")
        blocks.append(_section(text))
    for group in digest.groups:
        head = f"*{group.title}* (`{group.check}`): {len(group.items) + group.hidden}"
        lines.append(f"{group.title}: {len(group.items) + group.hidden}")
        if group.sets:
            blocks.append(_section(head))
            for one in group.sets:
                text = _set_text(one)
                lines.append(text)
                blocks.extend(_sections(text))
        else:
            parts = [head]
            for item in group.items:
                parts.append(f"• {item.tag} {', '.join(item.who)}: {item.what}")
            blocks.append(_section("\n".join(parts)))
        if group.hidden:
            more = (f"… and {group.hidden} more: `oprecon findings --check {group.check}` "
                    "lists every one")
            link = digest.findings_link(group.check)
            more += f", and so does the console: {link}" if link else ""
            lines.append(more)
            blocks.append(_section(more))
    blocks = blocks[:49]
    steps = ("" if any(g.sets for g in digest.groups)
             else "; the email digest has the steps for each item")
    blocks.append({"type": "context", "elements": [{
        "type": "mrkdwn",
        "text": _slack(f"oprecon · {digest.practice} · window {digest.window.key} · "
                       f"ids only{steps}"),
    }]})
    return {"text": "\n".join(lines), "blocks": blocks}


def _set_text(one: StepSet) -> str:
    """Items that share their steps: the steps once, then one line per item."""
    n = len(one.items)
    out = [f"{one.tag + ' · ' if one.tag else ''}{n} item{'s' if n != 1 else ''} "
           "with the same steps"]
    if one.what:
        out.append(f"What is wrong{' (the first; the others alike)' if n > 1 else ''}: "
                   f"{one.what}")
    out.append("What to do for each:")
    out.extend(f"{i}. {step}" for i, step in enumerate(one.steps, 1))
    if one.next_check:
        out.append(f"oprecon checks again: {one.next_check}")
    for item in one.items:
        line = f"• {'' if one.tag else item.tag + ' '}{', '.join(item.who) or item.fingerprint}"
        if not one.what:
            line += f": {item.what}"
        if not one.next_check:
            line += f" (checks again: {item.next_check})"
        out.append(f"{line} · `{item.fingerprint}`")
    return "\n".join(out)


def _sections(text: str, limit: int = 2900) -> list[dict[str, Any]]:
    """Slack caps a section's text: split at line ends, never inside a line."""
    chunks: list[list[str]] = []
    size = 0
    for line in text.split("\n"):
        n = len(_slack(line)) + 1
        if chunks and size + n <= limit:
            chunks[-1].append(line)
            size += n
        else:
            chunks.append([line])
            size = n
    return [_section("\n".join(chunk)) for chunk in chunks]
