"""Text hygiene every stage shares: masking PHI in free text.

It lives at the bottom of the flow so sources, digests and the log processor
(worker.runtime.logging) all use the same patterns.
"""

from __future__ import annotations

import re
from typing import Any, TextIO

REDACTED = "[redacted]"
EMAIL_PATTERN = re.compile(r"[\w.+'-]+@[\w-]+(?:\.[\w-]+)+")
PHONE_PATTERN = re.compile(
    r"(?<![\w-])(?:\+?1[\s.-]?)?\(?\d{3}\)?[\s.-]?\d{3}[\s.-]?\d{4}(?![\w-])")
DATE_PATTERN = re.compile(r"\b(?:19|20)\d{2}-[01]\d-[0-3]\d\b(?!T)")


def scrub_text(text: str) -> str:
    """Mask emails, phone numbers and bare dates (birth dates) in free text."""
    text = EMAIL_PATTERN.sub(REDACTED, text)
    text = PHONE_PATTERN.sub(REDACTED, text)
    return DATE_PATTERN.sub(REDACTED, text)


# -- control characters and ids -------------------------------------------------------

# C0 controls but tab/newline/CR, DEL, C1 controls, and the bidi overrides and isolates
# that can make a terminal line or digest read other than it is. Lone surrogates (bytes
# that were not UTF-8) cannot be encoded for a terminal, a mail or PostgreSQL either.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"
                      "\ud800-\udfff]")
_CONTROL_ALL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
MAX_ID = 64  # the state database's id columns


def has_control(text: str, *, newlines: bool = True) -> bool:
    """Whether `text` holds a control character (tab/CR/LF allowed with `newlines`)."""
    return (_CONTROL if newlines else _CONTROL_ALL).search(text) is not None


def strip_controls(text: str) -> str:
    """Text safe for one terminal line, a mail header or a digest: every control
    character (CR and LF included) becomes a space, escapes and NULs disappear."""
    if text.isprintable():
        return text
    return _CONTROL_ALL.sub(lambda m: " " if m.group() in "\t\n\r" else "", text)


def clean_multiline(text: str) -> str:
    """As `strip_controls`, keeping newlines and tabs (a digest body, a terminal block)."""
    return _CONTROL.sub("", text)


def id_problem(value: str) -> str | None:
    """Why `value` cannot be an id, or None. Ids end up in URL paths, mail subjects,
    terminal lines and 64-character columns, so anything that could act there is out."""
    if len(value) > MAX_ID:
        return f"longer than {MAX_ID} characters"
    if has_control(value, newlines=False):
        return "holds a control character"
    if value in (".", ".."):
        return "is a dot path segment"
    if "/" in value or "\\" in value:
        return "holds a slash"
    return None


_TERMINAL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


class TerminalText:
    """A text stream that drops control characters (escape sequences, CR, NUL) from
    everything written to it, keeping newlines and tabs: the CLI's stdout and stderr."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if not text.isprintable():
            text = _TERMINAL.sub("", text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def address_key(contact_id: str | None, email: str | None) -> str:
    """A stand-in for a contact's address where only "same address or not" matters (the
    Welcome resend's once-per-window rule): the journal keeps ids, never the address.
    Salted with the contact id, so two contacts' keys cannot be matched up."""
    import hashlib

    text = f"oprecon-address|{contact_id or ''}|{(email or '').strip().lower()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
