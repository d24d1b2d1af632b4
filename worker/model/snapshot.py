"""A point-in-time view of both systems, indexed once for the checks.

Sources stream records in; the snapshot keeps one copy of each and the indexes the
checks need (by patient, by contact, by portal user, links both ways), so every check
is a linear pass with dictionary lookups.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from worker.model.findings import Finding
from worker.model.records import (
    WELCOME_ACTION,
    AuditEvent,
    CaregiverLink,
    Contact,
    FamilyContact,
    InvalidRecord,
    Patient,
    PortalSource,
    PortalUser,
)


@dataclass
class Unknowns:
    """What the run cannot know because a row describing it could not be read.

    A row that cannot be read is not an absent row: a family contact with a typo in its
    authority still says *something* about that patient and contact, and treating it
    as missing would report a stale portal link (a false privacy alert) and resolve
    open findings as "no longer found". So the ids an unreadable row names become
    unknown for the run, and a table with an unreadable row that names no id at all is
    *blind*: nothing may be concluded from the absence of one of its rows.
    """

    patients: set[str] = field(default_factory=set)
    contacts: set[str] = field(default_factory=set)
    users: set[str] = field(default_factory=set)
    pairs: set[tuple[str, str]] = field(default_factory=set)
    blind: set[str] = field(default_factory=set)
    # Unreadable rows per table (an unterminated quote counts every row it swallowed).
    unreadable: dict[str, int] = field(default_factory=dict)

    def add(self, rec: InvalidRecord) -> None:
        table = rec.table
        assert table is not None
        self.unreadable[table] = self.unreadable.get(table, 0) + rec.rows
        own = (rec.patient_id, rec.contact_id, rec.portal_user_id,
               rec.extra.get("dependent_user_id"))
        rows = [own] if any(own) else []
        rows.extend(rec.recovered)
        if len(rows) < rec.rows:  # some row gave no id at all
            self.blind.add(table)
        for patient, contact, user, dep in rows:
            self._row(table, patient, contact, user, dep)

    def _row(self, table: str, patient: str | None, contact: str | None,
             user: str | None, dependent: str | None) -> None:
        if table == "portal_audit":  # Welcome events are keyed by email: unknowable
            self.blind.add(table)
        elif table == "family_contacts":
            if patient and contact:
                self.pairs.add((patient, contact))
            elif patient:
                self.patients.add(patient)
            elif contact:
                self.contacts.add(contact)
            else:
                self.blind.add(table)
        elif table == "patients":
            self._one(table, self.patients, patient)
        elif table == "contacts":
            self._one(table, self.contacts, contact)
        elif table == "portal_users":
            if not (user or patient or contact):
                self.blind.add(table)
            for ids, value in ((self.users, user), (self.patients, patient),
                               (self.contacts, contact)):
                if value:
                    ids.add(value)
        elif table in ("portal_links", "portal_sources"):
            if not (user or dependent):
                self.blind.add(table)
            self.users.update(v for v in (user, dependent) if v)

    def _one(self, table: str, ids: set[str], value: str | None) -> None:
        if value:
            ids.add(value)
        else:
            self.blind.add(table)

    def touches(self, patient_id: str | None = None, contact_id: str | None = None,
                user_id: str | None = None) -> bool:
        """`about`, or any id that is half of an unknown pair: a finding about a contact
        alone (their email) may rest on the family-contact row that could not be read."""
        if self.about(patient_id, contact_id, user_id):
            return True
        if not self.pairs or not (patient_id or contact_id):
            return False
        return any(p == patient_id or c == contact_id for p, c in self.pairs)

    def __bool__(self) -> bool:
        return bool(self.patients or self.contacts or self.users or self.pairs or self.blind)

    def about(self, patient_id: str | None = None, contact_id: str | None = None,
              user_id: str | None = None) -> bool:
        """Whether a conclusion about these ids rests on something unreadable."""
        return bool(
            (patient_id and patient_id in self.patients)
            or (contact_id and contact_id in self.contacts)
            or (user_id and user_id in self.users)
            or (patient_id and contact_id and (patient_id, contact_id) in self.pairs)
        )


@dataclass
class Snapshot:
    patients: dict[str, Patient] = field(default_factory=dict)
    contacts: dict[str, Contact] = field(default_factory=dict)
    family: list[FamilyContact] = field(default_factory=list)
    fc_by_patient: dict[str, list[FamilyContact]] = field(default_factory=lambda: defaultdict(list))
    fc_by_contact: dict[str, list[FamilyContact]] = field(default_factory=lambda: defaultdict(list))
    contacts_by_patient_id: dict[str, list[Contact]] = field(
        default_factory=lambda: defaultdict(list)
    )
    users: dict[str, PortalUser] = field(default_factory=dict)
    users_by_patient: dict[str, list[PortalUser]] = field(default_factory=lambda: defaultdict(list))
    users_by_contact: dict[str, list[PortalUser]] = field(default_factory=lambda: defaultdict(list))
    links: set[tuple[str, str]] = field(default_factory=set)
    links_by_caregiver: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    links_by_dependent: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    sources: dict[str, PortalSource] = field(default_factory=dict)
    # Latest `Welcome Mail Sent` per lower-cased email.
    welcome_sent: dict[str, datetime] = field(default_factory=dict)
    invalid: list[InvalidRecord] = field(default_factory=list)
    portal_loaded: bool = True
    # What unreadable rows describe (see `Unknowns`), and rows read per table.
    unknown: Unknowns = field(default_factory=lambda: Unknowns())
    audit_rows: int = 0
    # `contact_duplicate` findings an incremental scan decided over every contact of the
    # practice (its snapshot holds only a neighbourhood); None: decide from `contacts`.
    duplicate_findings: list[Finding] | None = None

    # -- building ---------------------------------------------------------------------

    def add(self, record: object) -> None:
        """Index one record; duplicates of an id become `invalid_record`, first one wins."""
        match record:
            case Patient():
                if record.patient_id in self.patients:
                    self._dup("patients", record.patient_id, patient_id=record.patient_id)
                else:
                    self.patients[record.patient_id] = record
            case Contact():
                if record.contact_id in self.contacts:
                    self._dup("contacts", record.contact_id, contact_id=record.contact_id)
                else:
                    self.contacts[record.contact_id] = record
                    if record.patient_id:
                        self.contacts_by_patient_id[record.patient_id].append(record)
                if record.invalid is not None:  # kept without its unreadable DOB
                    self.invalid.append(record.invalid)
            case FamilyContact():
                self.family.append(record)
                self.fc_by_patient[record.patient_id].append(record)
                self.fc_by_contact[record.contact_id].append(record)
            case PortalUser():
                if record.user_id in self.users:
                    self._dup("portal_users", record.user_id, portal_user_id=record.user_id)
                    return
                self.users[record.user_id] = record
                if record.op_patient_id:
                    self.users_by_patient[record.op_patient_id].append(record)
                if record.op_contact_id:
                    self.users_by_contact[record.op_contact_id].append(record)
            case CaregiverLink():
                key = (record.caregiver_user_id, record.dependent_user_id)
                self.links.add(key)
                self.links_by_caregiver[key[0]].add(key[1])
                self.links_by_dependent[key[1]].add(key[0])
            case PortalSource():
                self.sources[record.user_id] = record
            case AuditEvent():
                self.audit_rows += 1
                if record.action == WELCOME_ACTION and record.email:
                    email = record.email.strip().lower()
                    seen = self.welcome_sent.get(email)
                    if seen is None or record.at > seen:
                        self.welcome_sent[email] = record.at
            case InvalidRecord():
                self.invalid.append(record)
                if record.table is not None:
                    self.unknown.add(record)
            case _:
                raise TypeError(f"not a source record: {type(record).__name__}")

    def _dup(
        self,
        source: str,
        ident: str,
        patient_id: str | None = None,
        contact_id: str | None = None,
        portal_user_id: str | None = None,
    ) -> None:
        self.invalid.append(
            InvalidRecord(
                source=source,
                line=None,
                reason=f"duplicate id {ident}: the first row was kept",
                patient_id=patient_id,
                contact_id=contact_id,
                portal_user_id=portal_user_id,
            )
        )

    @classmethod
    def build(cls, *streams: Iterable[object]) -> Snapshot:
        """Index every record. The cyclic GC is paused meanwhile: a large practice
        allocates millions of small objects and none of them forms a cycle, so
        collections would only rescan them (about a third of the load time)."""
        snap = cls()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            for stream in streams:
                for record in stream:
                    snap.add(record)
        finally:
            if was_enabled:
                gc.enable()
        return snap

    # -- lookups the checks share -----------------------------------------------------

    def active_users_for_patient(self, patient_id: str) -> list[PortalUser]:
        return [u for u in self.users_by_patient.get(patient_id, ()) if u.active]

    def active_users_for_contact(self, contact_id: str) -> list[PortalUser]:
        return [u for u in self.users_by_contact.get(contact_id, ()) if u.active]

    def is_authorized(self, fc: FamilyContact) -> bool:
        """Joint/Exclusive, not Self, and the contact exists and is active."""
        if not fc.authority.grants_access or fc.is_self:
            return False
        contact = self.contacts.get(fc.contact_id)
        return contact is not None and contact.active

    def counts(self) -> dict[str, int]:
        return {
            "patients": len(self.patients),
            "contacts": len(self.contacts),
            "family_contacts": len(self.family),
            "portal_users": len(self.users),
            "portal_links": len(self.links),
            "portal_sources": len(self.sources),
            "invalid": len(self.invalid),
        }

    def rows_read(self, table: str) -> int:
        """Readable rows of `table` kept in the snapshot (duplicates not counted)."""
        return {
            "patients": len(self.patients), "contacts": len(self.contacts),
            "family_contacts": len(self.family), "portal_users": len(self.users),
            "portal_links": len(self.links), "portal_sources": len(self.sources),
            "portal_audit": self.audit_rows,
        }.get(table, 0)

    def unreadable_over(self, percent: float, min_rows: int = 0) -> dict[str, tuple[int, int]]:
        """Tables whose unreadable rows (at least `min_rows` of them) exceed `percent` of
        their rows: (bad, total)."""
        shares = {table: (bad, bad + self.rows_read(table))
                  for table, bad in self.unknown.unreadable.items()}
        return shares_over(shares, percent, min_rows)

    @property
    def records(self) -> int:
        c = self.counts()
        return sum(v for k, v in c.items() if k != "invalid")


# -- the unreadable share of whole files, measured outside a snapshot ---------------------

_R = TypeVar("_R")


def over_limit(bad: int, total: int, percent: float, min_rows: int) -> bool:
    """Whether `bad` unreadable rows of `total` are too many to act on
    (settings.unreadable_alert_percent, unreadable_alert_min_rows)."""
    return bool(total) and bad >= min_rows and bad * 100.0 > percent * total


def shares_over(shares: dict[str, tuple[int, int]], percent: float,
                min_rows: int = 0) -> dict[str, tuple[int, int]]:
    """The (bad, total) entries of `shares` over the limit, by table name."""
    return {table: (bad, total) for table, (bad, total) in sorted(shares.items())
            if over_limit(bad, total, percent, min_rows)}


@dataclass
class FileShares:
    """Unreadable rows per file as a run measured them outside its snapshot: a shard of
    a sharded scan streams whole files but keeps only its part of them; an incremental
    scan reads only the rows changed since the last scan, and counts each OP file's rows.

    `shares`: table → (unreadable rows, rows in the file). `lower_bound`: the unreadable
    rows counted are only some of the file's (an incremental scan's changed rows), so
    the share is at least this much. `examples`: the first unreadable rows, for the alert.
    """

    shares: dict[str, tuple[int, int]] = field(default_factory=dict)
    examples: dict[str, list[InvalidRecord]] = field(default_factory=dict)
    lower_bound: bool = False
    # Tables in which a row named no id at all (what `Unknowns.blind` says of a snapshot).
    blind: set[str] = field(default_factory=set)


class FileTally:
    """Counts a stream of whole files into `FileShares` (readable rows, unreadable rows
    as `Unknowns` counts them, the first few unreadable ones) without keeping the rows."""

    EXAMPLES = 3

    def __init__(self) -> None:
        self.unknown = Unknowns()
        self.readable: dict[str, int] = {}
        self.examples: dict[str, list[InvalidRecord]] = {}

    def add(self, table: str, record: object) -> None:
        if isinstance(record, InvalidRecord):
            if record.table is None:
                return
            self.unknown.add(record)
            seen = self.examples.setdefault(record.table, [])
            if len(seen) < self.EXAMPLES:
                seen.append(record)
        else:
            self.readable[table] = self.readable.get(table, 0) + 1

    def count(self, table: str, records: Iterable[_R]) -> Iterator[_R]:
        """`records`, passed through and counted as rows of `table`."""
        for record in records:
            self.add(table, record)
            yield record

    def shares(self, tables: Iterable[str]) -> FileShares:
        """The whole-file shares of `tables` (every one of them streamed whole)."""
        out = FileShares()
        for table in tables:
            bad = self.unknown.unreadable.get(table, 0)
            out.shares[table] = (bad, bad + self.readable.get(table, 0))
            if table in self.examples:
                out.examples[table] = list(self.examples[table])
        out.blind = {t for t in self.unknown.blind if t in out.shares}
        return out
