"""Text hygiene every stage shares: masking PHI in free text.

It lives at the bottom of the flow so sources, digests and the log processor
(worker.runtime.logging) all use the same patterns.
"""

from __future__ import annotations

import re

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
