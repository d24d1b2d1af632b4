"""The small interfaces every source adapter implements.

Readers yield records (or `InvalidRecord` for rows they cannot parse) one at a time so
a million-row export never sits in memory twice. `since` asks for records changed at or
after a time, which is how incremental scans avoid rereading everything.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Protocol, runtime_checkable

from worker.model.records import (
    AuditEvent,
    CaregiverLink,
    Contact,
    FamilyContact,
    InvalidRecord,
    Patient,
    PortalSource,
    PortalUser,
)


class SourceError(RuntimeError):
    """A source cannot be read at all (missing file, unreachable server): the run stops."""


class SourceUnavailable(SourceError):
    """The source may answer later (connection refused, timeouts): worth retrying. Other
    SourceErrors (missing columns, a broken contract) fail the same way every time."""


@runtime_checkable
class OPReader(Protocol):
    def patients(self, since: datetime | None = None) -> Iterator[Patient | InvalidRecord]: ...

    def contacts(self, since: datetime | None = None) -> Iterator[Contact | InvalidRecord]: ...

    def family_contacts(
        self, since: datetime | None = None
    ) -> Iterator[FamilyContact | InvalidRecord]: ...


@runtime_checkable
class PortalReader(Protocol):
    def users(self, since: datetime | None = None) -> Iterator[PortalUser | InvalidRecord]: ...

    def links(self) -> Iterator[CaregiverLink | InvalidRecord]: ...

    def sources(self) -> Iterator[PortalSource | InvalidRecord]: ...

    def audit(self, since: datetime | None = None) -> Iterator[AuditEvent | InvalidRecord]: ...


class ReadOnlyPortal(RuntimeError):
    """Raised by a portal adapter that cannot change anything (CSV exports)."""


@runtime_checkable
class PortalWriter(Protocol):
    """The three changes the support guide lets staff make, and a fresh read of one user."""

    writable: bool

    def get_user(self, user_id: str) -> PortalUser | None: ...

    def set_user_email(self, user_id: str, email: str, idempotency_key: str) -> None: ...

    def refresh_source(self, user_id: str, idempotency_key: str) -> None: ...

    def resend_welcome(self, contact_id: str, email: str, idempotency_key: str) -> None: ...
