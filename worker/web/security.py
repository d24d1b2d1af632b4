"""Session cookie, CSRF token and response headers.

The session is a signed cookie (itsdangerous) holding the user's row id, their
`session_version`, a CSRF token and the time of the last request: a request more than
`web_session_idle_minutes` after the previous one finds the session over. The cookie is
HttpOnly, SameSite=Lax, and Secure when the request came over https (directly or through
a proxy that says so). Before login the cookie carries only a CSRF token for the form.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from worker.state.db import kv_get, kv_set

COOKIE = "oprecon_session"
CSRF_FIELD = "csrf_token"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


def secret_key(settings: Settings, sessions: sessionmaker[Session], now: datetime) -> str:
    """The configured key, or one made once and kept in the state database so every
    console process (and a restart) signs alike."""
    if settings.web_secret_key is not None:
        return settings.web_secret_key.get_secret_value()
    with sessions.begin() as session:
        stored = kv_get(session, settings.practice, "web_secret")
        if stored and stored.get("key"):
            return str(stored["key"])
        key = secrets.token_urlsafe(48)
        kv_set(session, settings.practice, "web_secret", {"key": key}, now)
        return key


@dataclass
class SessionData:
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    user_id: int | None = None
    version: int = 0
    seen: float = 0.0
    flash: str | None = None  # one message for the next page (the result of an action)

    def to_cookie(self) -> dict[str, Any]:
        return {"c": self.csrf, "u": self.user_id, "v": self.version, "t": self.seen,
                "f": self.flash}


class Signer:
    def __init__(self, key: str) -> None:
        self._s = URLSafeSerializer(key, salt="oprecon-console-session")

    def dumps(self, data: SessionData) -> str:
        return self._s.dumps(data.to_cookie())

    def loads(self, value: str | None) -> SessionData | None:
        if not value:
            return None
        try:
            raw = self._s.loads(value)
        except BadSignature:
            return None
        if not isinstance(raw, dict) or not isinstance(raw.get("c"), str):
            return None
        user = raw.get("u")
        return SessionData(csrf=raw["c"], user_id=user if isinstance(user, int) else None,
                           version=int(raw.get("v") or 0), seen=float(raw.get("t") or 0),
                           flash=raw.get("f") if isinstance(raw.get("f"), str) else None)


def csrf_ok(expected: str, given: Any) -> bool:
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())
