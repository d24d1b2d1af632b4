"""The kept duplicate index: rows of `duplicate_index` and `duplicate_key_changes`.

Plain reads and writes inside the caller's session (it commits); what the bytes and the
JSON mean is worker.matching.index's, when they are used worker/scan/duplicate_index.py's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from worker.state.models import DuplicateIndex, DuplicateKeyChange


@dataclass(frozen=True)
class IndexHead:
    """The kept index without its keys (those are read only when not cached)."""

    token: str
    built_at: datetime
    covered_at: datetime
    contacts: int
    model: dict[str, Any]


def index_head(session: Session, practice: str) -> IndexHead | None:
    row = session.execute(
        select(DuplicateIndex.token, DuplicateIndex.built_at, DuplicateIndex.covered_at,
               DuplicateIndex.contacts, DuplicateIndex.model)
        .where(DuplicateIndex.practice == practice)
    ).one_or_none()
    if row is None:
        return None
    return IndexHead(row.token, row.built_at, row.covered_at, row.contacts, dict(row.model))


def index_keys(session: Session, practice: str, token: str) -> bytes | None:
    """The packed keys of the build `token` (None when another build replaced it)."""
    return session.scalar(select(DuplicateIndex.keys).where(
        DuplicateIndex.practice == practice, DuplicateIndex.token == token))


def key_changes(session: Session, practice: str) -> dict[str, list[int] | None]:
    rows = session.execute(select(DuplicateKeyChange.contact_id, DuplicateKeyChange.keys)
                           .where(DuplicateKeyChange.practice == practice))
    return {cid: (list(keys) if keys is not None else None) for cid, keys in rows}


def save_index(
    session: Session, practice: str, *, token: str, built_at: datetime, covered_at: datetime,
    contacts: int, model: dict[str, Any], keys: bytes, now: datetime,
) -> None:
    """A whole run's index, replacing the kept one and the changes kept on top of it."""
    session.execute(delete(DuplicateKeyChange).where(DuplicateKeyChange.practice == practice))
    session.execute(delete(DuplicateIndex).where(DuplicateIndex.practice == practice))
    session.add(DuplicateIndex(
        practice=practice, token=token, built_at=built_at, covered_at=covered_at,
        contacts=contacts, model=model, keys=keys, updated_at=now))


def save_key_changes(
    session: Session, practice: str, changes: Mapping[str, list[int] | None],
    covered_at: datetime, now: datetime,
) -> None:
    """Contacts' keys as an incremental scan read them (None: gone), and the watermark
    the kept index now covers."""
    for contact_id, keys in changes.items():
        row = session.get(DuplicateKeyChange, (practice, contact_id))
        if row is None:
            session.add(DuplicateKeyChange(practice=practice, contact_id=contact_id,
                                           keys=keys, updated_at=now))
        else:
            row.keys, row.updated_at = keys, now
    advance_index(session, practice, covered_at, now)


def advance_index(session: Session, practice: str, covered_at: datetime, now: datetime) -> None:
    session.execute(update(DuplicateIndex).where(DuplicateIndex.practice == practice)
                    .values(covered_at=covered_at, updated_at=now))
