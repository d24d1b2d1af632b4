"""One logging setup for every process: structlog, JSON in production, PHI redacted.

Celery's and the stdlib's records go through the same `ProcessorFormatter`, so every
line has the same shape. The redaction processor runs last before rendering: names,
emails, phone numbers and birth dates never reach a log line, whoever logged them.
"""

from __future__ import annotations

import logging
import logging.config
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from worker.model.text import EMAIL_PATTERN, PHONE_PATTERN, REDACTED, scrub_text

# Keys whose values are PHI whatever they hold.
PHI_KEYS = frozenset(
    {
        "first_name", "last_name", "name", "full_name", "email", "emails", "phone", "dob",
        "birth_date", "date_of_birth", "address", "city", "postcode", "recipient",
        "recipients", "to",
    }
)


# Keys whose values are times or keys we write ourselves: dates there are never birth
# dates, and masking them would hide which digest window or run a line is about.
TIME_KEYS = frozenset({"window_key", "at", "since", "until", "next_check_at", "first_seen_at"})


def _scrub(value: Any, dates: bool = True) -> Any:
    if isinstance(value, str):
        if not dates:
            return PHONE_PATTERN.sub(REDACTED, EMAIL_PATTERN.sub(REDACTED, value))
        return scrub_text(value)
    if isinstance(value, dict):
        # Nested "name" is Celery's task name (its `data` extra), not a person's.
        return {
            k: REDACTED if k in PHI_KEYS and k != "name" else _scrub(v, dates)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redact_phi(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drop PHI keys' values and mask PHI patterns everywhere."""
    for key in list(event_dict):
        if key in PHI_KEYS:
            event_dict[key] = REDACTED
        elif key not in ("timestamp", "level", "logger"):
            event_dict[key] = _scrub(event_dict[key], dates=key not in TIME_KEYS)
    return event_dict


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
    ]


_configured: tuple[str, str] | None = None


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the write, so a handler set up
    while stderr was redirected (a test's capture, an embedding tool) never writes to
    that stream after it is closed, from a library's thread for instance."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(level: str = "INFO", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog and the stdlib root logger once per process (idempotent)."""
    global _configured
    if fmt == "auto":
        fmt = "console" if getattr(stream or sys.stderr, "isatty", lambda: False)() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_phi,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_oprecon", False):
            root.removeHandler(old)
    handler._oprecon = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    _configured = (level, fmt)
