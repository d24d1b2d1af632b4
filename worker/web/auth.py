"""Staff accounts: argon2id password hashes, roles, and slowed repeated failed logins.

Failed logins are counted per user name (known or not) in the state database's kv table,
so every console process sees the same count: after `web_login_free_failures` failures
each further try must wait, doubling from five seconds up to fifteen minutes; a success
clears the count. A refused-while-waiting try does not check the password at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from worker.state.db import kv_get, kv_set
from worker.state.models import KeyValue, StaffUser

ROLES = ("viewer", "operator")
USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
FIRST_WAIT = timedelta(seconds=5)
MAX_WAIT = timedelta(minutes=15)
_hasher = PasswordHasher()  # argon2id, the library's memory-hard defaults
# Verified against when the user does not exist, so both cases cost the same time.
_DUMMY_HASH = _hasher.hash("not a real password: timing only")


class UserError(Exception):
    """A refused account change; `str()` is one line."""


def check_username(name: str) -> str:
    if not USERNAME.match(name):
        raise UserError("user names are 1-64 letters, digits and . _ @ - "
                        "(starting with a letter or digit)")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password must be at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise UserError(f"the password must be at most {MAX_PASSWORD} characters")
    return password


def hash_password(password: str) -> str:
    return _hasher.hash(check_password(password))


def get_user(session: Session, practice: str, username: str) -> StaffUser | None:
    return session.scalar(select(StaffUser).where(
        StaffUser.practice == practice, StaffUser.username == username))


def add_user(session: Session, practice: str, username: str, role: str, password: str,
             now: datetime) -> StaffUser:
    check_username(username)
    if role not in ROLES:
        raise UserError(f"--role: one of {', '.join(ROLES)}")
    if get_user(session, practice, username) is not None:
        raise UserError(f"user {username} already exists (users set-password changes the "
                        "password)")
    user = StaffUser(practice=practice, username=username, role=role,
                     password_hash=hash_password(password), session_version=1,
                     created_at=now, password_changed_at=now)
    session.add(user)
    return user


def set_password(session: Session, practice: str, username: str, password: str,
                 now: datetime) -> StaffUser:
    """A new password also ends every session of that user (session_version)."""
    user = _existing(session, practice, username)
    user.password_hash = hash_password(password)
    user.password_changed_at = now
    user.session_version += 1
    return user


def remove_user(session: Session, practice: str, username: str) -> None:
    session.delete(_existing(session, practice, username))


def list_users(session: Session, practice: str) -> list[StaffUser]:
    return list(session.scalars(select(StaffUser).where(StaffUser.practice == practice)
                                .order_by(StaffUser.username)))


def _existing(session: Session, practice: str, username: str) -> StaffUser:
    user = get_user(session, practice, username)
    if user is None:
        raise UserError(f"no user {username} (oprecon users list shows them)")
    return user


@dataclass
class LoginResult:
    user: StaffUser | None
    wait_seconds: int = 0  # > 0: refused without checking, try again after this


def _throttle_key(username: str) -> str:
    return f"login_failures:{username.lower()[:64]}"


def login(session: Session, practice: str, username: str, password: str, now: datetime,
          free_failures: int) -> LoginResult:
    """Check a login; the caller commits (the failure count must be kept either way)."""
    key = _throttle_key(username)
    record = kv_get(session, practice, key) or {}
    until = datetime.fromisoformat(record["until"]) if record.get("until") else None
    if until is not None and now < until:
        return LoginResult(None, max(1, int((until - now).total_seconds() + 0.999)))
    user = get_user(session, practice, username) if USERNAME.match(username) else None
    ok = False
    try:
        ok = _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        ok = False
    if ok and user is not None:
        session.execute(delete(KeyValue).where(KeyValue.practice == practice,
                                               KeyValue.key == key))
        if _hasher.check_needs_rehash(user.password_hash):
            user.password_hash = _hasher.hash(password)
        user.last_login_at = now
        return LoginResult(user)
    failures = int(record.get("failures", 0)) + 1
    value: dict[str, object] = {"failures": failures}
    if failures >= free_failures:
        wait = min(FIRST_WAIT * 2 ** min(failures - free_failures, 20), MAX_WAIT)
        value["until"] = (now + wait).isoformat()
    kv_set(session, practice, key, value, now)
    return LoginResult(None)
