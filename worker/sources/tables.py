"""The reader methods every table-shaped source shares (CSV exports, SQL databases).

A source supplies two primitives — `_read(table, since)` streams a table's records and
`_select(table, match, folded, changed_since)` streams the rows matching any of some
ids — and these mixins turn them into the OPReader / PortalReader methods and the
targeted reads of incremental scans, so the two adapters cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

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
from worker.sources.base import ReadOnlyPortal

# The columns that identify an OP row: what `read_ids` returns, trimmed, joined by ID_SEP.
ID_COLUMNS: dict[str, tuple[str, ...]] = {
    "patients": ("patient_id",),
    "contacts": ("contact_id",),
    "family_contacts": ("patient_id", "contact_id"),
}
ID_SEP = "\x1f"


class _Tables:
    if TYPE_CHECKING:  # supplied by the source class, which comes later in the MRO
        _read: Callable[..., Iterator[Any]]
        _select: Callable[..., Iterator[Any]]
        _ids: Callable[[str], Iterator[str]]
        _count_rows: Callable[[str], int]


class OPTables(_Tables):
    """OPReader over patients, contacts and family_contacts."""

    label = "OP"

    def patients(self, since: datetime | None = None) -> Iterator[Patient | InvalidRecord]:
        return self._read("patients", since)

    def contacts(self, since: datetime | None = None) -> Iterator[Contact | InvalidRecord]:
        return self._read("contacts", since)

    def family_contacts(
        self, since: datetime | None = None
    ) -> Iterator[FamilyContact | InvalidRecord]:
        return self._read("family_contacts", since)

    def read_ids(self, table: str) -> Iterator[str]:
        """The ids of every row of an OP table (a family contact's as
        `patient_id + ID_SEP + contact_id`), reading only those columns: what an
        incremental scan compares with the last one's to see rows deleted since. A row
        without its ids gives nothing (it is reported by the scans that read it whole)."""
        if table not in ID_COLUMNS:
            raise ValueError(f"no ids to read for {table}")
        return self._ids(table)

    def count_rows(self, table: str) -> int:
        """How many rows an OP table holds (well-formed ones, for an export): compared
        from scan to scan, it says whether any may have been deleted."""
        if table not in ID_COLUMNS:
            raise ValueError(f"no row count for {table}")
        return self._count_rows(table)

    # -- targeted reads (incremental scans): rows matching any of the given ids ----------

    def select_patients(self, ids: Collection[str]) -> Iterator[Patient | InvalidRecord]:
        return self._select("patients", {"patient_id": ids})

    def select_contacts(
        self,
        ids: Collection[str] = (),
        patient_ids: Collection[str] = (),
        emails: Collection[str] = (),
        phones: Collection[str] = (),
        dobs: Collection[str] = (),
    ) -> Iterator[Contact | InvalidRecord]:
        """By id, by the patient the contact is, by email (trimmed, lower case), or by
        phone or date of birth (trimmed, as written): the last three are the duplicate
        check's blocking keys, read by a family-scoped run."""
        return self._select(
            "contacts", {"contact_id": ids, "patient_id": patient_ids, "email": emails,
                         "phone": phones, "dob": dobs},
            folded=("email",),
        )

    def select_family_contacts(
        self, patient_ids: Collection[str] = (), contact_ids: Collection[str] = ()
    ) -> Iterator[FamilyContact | InvalidRecord]:
        return self._select(
            "family_contacts", {"patient_id": patient_ids, "contact_id": contact_ids}
        )


class PortalTables(_Tables):
    """PortalReader over portal_users, portal_links, portal_sources and portal_audit."""

    label = "portal"

    def users(self, since: datetime | None = None) -> Iterator[PortalUser | InvalidRecord]:
        return self._read("portal_users", since)

    def links(self) -> Iterator[CaregiverLink | InvalidRecord]:
        return self._read("portal_links")

    def sources(self) -> Iterator[PortalSource | InvalidRecord]:
        return self._read("portal_sources")

    def audit(self, since: datetime | None = None) -> Iterator[AuditEvent | InvalidRecord]:
        return self._read("portal_audit", since)

    # -- targeted reads (incremental scans): rows matching any of the given ids ----------

    def select_users(
        self,
        ids: Collection[str] = (),
        patient_ids: Collection[str] = (),
        contact_ids: Collection[str] = (),
        changed_since: datetime | None = None,
    ) -> Iterator[PortalUser | InvalidRecord]:
        """By id, by OP patient or contact, or changed since a time: in one pass."""
        return self._select("portal_users", {
            "user_id": ids, "op_patient_id": patient_ids, "op_contact_id": contact_ids,
        }, changed_since=changed_since)

    def select_links(self, user_ids: Collection[str]) -> Iterator[CaregiverLink | InvalidRecord]:
        """Links with either end among the users."""
        return self._select(
            "portal_links", {"caregiver_user_id": user_ids, "dependent_user_id": user_ids}
        )

    def select_sources(self, user_ids: Collection[str]) -> Iterator[PortalSource | InvalidRecord]:
        return self._select("portal_sources", {"user_id": user_ids})


class ReadOnlyPortalTables(PortalTables):
    """A copy of the portal (exports, a database dump): it can be read, never changed, and
    each refusal says where staff make the change instead."""

    writable = False
    what = "this portal copy"

    def set_user_email(self, user_id: str, email: str, idempotency_key: str) -> None:
        raise ReadOnlyPortal(f"{self.what} is read-only: set the email in the portal")

    def refresh_source(self, user_id: str, idempotency_key: str) -> None:
        raise ReadOnlyPortal(
            f"{self.what} is read-only: disconnect and connect the source in the portal"
        )

    def resend_welcome(self, contact_id: str, email: str, idempotency_key: str) -> None:
        raise ReadOnlyPortal(f"{self.what} is read-only: use Register in OP")
