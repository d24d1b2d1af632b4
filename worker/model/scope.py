"""Which records a run looks at: everything, one patient's family, or one contact's.

An ad hoc run still reads the whole snapshot (duplicates and links need the
neighbours) but only reports, resolves and fixes findings that touch its scope, so a
patient-level run can never resolve someone else's finding by not looking at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.model.findings import Finding
from worker.model.snapshot import Snapshot


@dataclass(frozen=True)
class Scope:
    kind: str = "all"  # all | patient | contact | entities
    target: str | None = None
    patient_ids: frozenset[str] = field(default_factory=frozenset)
    contact_ids: frozenset[str] = field(default_factory=frozenset)
    user_ids: frozenset[str] = field(default_factory=frozenset)
    # Checks this run neither reports nor resolves: an incremental run reads only a
    # neighbourhood, too little for checks that compare every contact with every other.
    exclude_checks: frozenset[str] = field(default_factory=frozenset)
    # Contacts whose duplicate groups this run decides (contact_duplicate only; when set,
    # the only ones): an incremental scan's changed contacts (a family run's scope
    # contacts) and every member of their groups, so a group replaced by another is
    # resolved even if none of its members changed, and groups of contacts nearby are
    # left alone.
    duplicate_contact_ids: frozenset[str] = field(default_factory=frozenset)
    # Checks this run reports but never resolves by not seeing them: a family run with no
    # kept duplicate index finds candidates through exact keys only, the full scan decides.
    keep_unseen: frozenset[str] = field(default_factory=frozenset)
    # Ids this run leaves alone (worker.scan.locks, "fences"): a family run wrote their
    # findings from a newer read while this practice scan was reading.
    ceded_patients: frozenset[str] = field(default_factory=frozenset)
    ceded_contacts: frozenset[str] = field(default_factory=frozenset)
    ceded_users: frozenset[str] = field(default_factory=frozenset)
    # Files whose unreadable-share alert (an id-less invalid_record) this partial run
    # measured and raises: an incremental scan that found one over the limit among its
    # changed rows. Never resolved by a partial run: only a whole read can say a file
    # is readable again.
    files: frozenset[str] = field(default_factory=frozenset)

    @property
    def label(self) -> str:
        return "all" if self.kind == "all" else f"{self.kind}:{self.target}"

    @property
    def is_all(self) -> bool:
        return self.kind == "all"

    def covers(
        self,
        patient_id: str | None,
        contact_id: str | None,
        portal_user_id: str | None,
        contact_ids: list[str] | tuple[str, ...] | None = None,
        check: str | None = None,
    ) -> bool:
        if self.cedes(patient_id, contact_id, portal_user_id, contact_ids):
            return False
        if self.is_all:
            return True
        if check == "contact_duplicate" and self.duplicate_contact_ids:
            # Decided for these contacts only: a group elsewhere in the neighbourhood was
            # not compared, so it must be neither raised nor resolved.
            return any(c in self.duplicate_contact_ids for c in contact_ids or ())
        return (
            (patient_id is not None and patient_id in self.patient_ids)
            or (contact_id is not None and contact_id in self.contact_ids)
            or (portal_user_id is not None and portal_user_id in self.user_ids)
            or any(c in self.contact_ids for c in contact_ids or ())
        )

    def cedes(
        self,
        patient_id: str | None,
        contact_id: str | None,
        portal_user_id: str | None,
        contact_ids: list[str] | tuple[str, ...] | None = None,
    ) -> bool:
        """True when any id of a finding was ceded to a family run's newer read."""
        if not (self.ceded_patients or self.ceded_contacts or self.ceded_users):
            return False
        return (
            (patient_id is not None and patient_id in self.ceded_patients)
            or (contact_id is not None and contact_id in self.ceded_contacts)
            or (portal_user_id is not None and portal_user_id in self.ceded_users)
            or any(c in self.ceded_contacts for c in contact_ids or ())
        )

    def covers_check(self, check: str) -> bool:
        return check not in self.exclude_checks

    def covers_finding(self, f: Finding) -> bool:
        if self.files and f.check == "invalid_record" and f.data.get("file") in self.files:
            return self.covers_check(f.check)
        return self.covers_check(f.check) and self.covers(
            f.patient_id, f.contact_id, f.portal_user_id, f.contact_ids, f.check
        )


ALL = Scope()


def _with_users(snap: Snapshot, patients: set[str], contacts: set[str]) -> frozenset[str]:
    users = {u.user_id for p in patients for u in snap.users_by_patient.get(p, ())}
    users |= {u.user_id for c in contacts for u in snap.users_by_contact.get(c, ())}
    return frozenset(users)


def for_patient(snap: Snapshot, patient_id: str) -> Scope:
    """The patient, every contact on their chart (or who is them), and their portal users."""
    contacts = {fc.contact_id for fc in snap.fc_by_patient.get(patient_id, ())}
    contacts |= {c.contact_id for c in snap.contacts_by_patient_id.get(patient_id, ())}
    patients = {patient_id}
    return Scope(
        "patient",
        patient_id,
        frozenset(patients),
        frozenset(contacts),
        _with_users(snap, patients, contacts),
    )


def for_contact(snap: Snapshot, contact_id: str) -> Scope:
    """The contact, the charts they are on, their own chart, and the portal users of all."""
    patients = {fc.patient_id for fc in snap.fc_by_contact.get(contact_id, ())}
    contact = snap.contacts.get(contact_id)
    if contact is not None and contact.patient_id:
        patients.add(contact.patient_id)
    contacts = {contact_id}
    return Scope(
        "contact",
        contact_id,
        frozenset(patients),
        frozenset(contacts),
        _with_users(snap, patients, contacts),
    )
