"""A point-in-time view of both systems, indexed once for the checks.

Sources stream records in; the snapshot keeps one copy of each and the indexes the
checks need (by patient, by contact, by portal user, links both ways), so every check
is a linear pass with dictionary lookups.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

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
                if record.action == WELCOME_ACTION and record.email:
                    email = record.email.strip().lower()
                    seen = self.welcome_sent.get(email)
                    if seen is None or record.at > seen:
                        self.welcome_sent[email] = record.at
            case InvalidRecord():
                self.invalid.append(record)
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

    @property
    def records(self) -> int:
        c = self.counts()
        return sum(v for k, v in c.items() if k != "invalid")
