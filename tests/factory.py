"""Tiny builders for hand-made practices in tests: defaults are a clean family."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from worker.records import (
    AuditEvent,
    Authority,
    CaregiverLink,
    Contact,
    FamilyContact,
    Patient,
    PortalSource,
    PortalUser,
)
from worker.snapshot import Snapshot

OLD = datetime(2026, 1, 1, tzinfo=UTC)


def patient(pid: str, **kw: Any) -> Patient:
    base: dict[str, Any] = dict(first_name="Kid", last_name="Doe", dob=date(2018, 5, 1),
                                email="", status="Active", updated_at=OLD)
    base.update(kw)
    return Patient(patient_id=pid, **base)


def contact(cid: str, **kw: Any) -> Contact:
    # Distinct first names and addresses, so two test contacts never look like one person.
    base: dict[str, Any] = dict(first_name=f"Pat{cid}", last_name=f"Doe{cid}",
                                email=f"{cid.lower()}@example.org", dob=None, phone="",
                                address=f"{cid} Main St", city="Town", postcode="12345",
                                active=True, patient_id=None, updated_at=OLD)
    base.update(kw)
    return Contact(contact_id=cid, **base)


def fc(pid: str, cid: str, role: str = "Mother", authority: Authority = Authority.JOINT,
       **kw: Any) -> FamilyContact:
    return FamilyContact(patient_id=pid, contact_id=cid, role_reason=role, authority=authority,
                         updated_at=kw.get("updated_at", OLD))


def caregiver(uid: str, cid: str, **kw: Any) -> PortalUser:
    base: dict[str, Any] = dict(op_patient_id=None, op_contact_id=cid, first_name="Pat",
                                last_name="Doe", email=f"{cid.lower()}@example.org",
                                role="Caregiver", active=True, updated_at=OLD)
    base.update(kw)
    return PortalUser(user_id=uid, **base)


def patient_user(uid: str, pid: str, **kw: Any) -> PortalUser:
    base: dict[str, Any] = dict(op_patient_id=pid, op_contact_id=None, first_name="Kid",
                                last_name="Doe", email=f"{pid.lower()}@dummy.com",
                                role="Patient", active=True, updated_at=OLD)
    base.update(kw)
    return PortalUser(user_id=uid, **base)


def link(cu: str, du: str) -> CaregiverLink:
    return CaregiverLink(caregiver_user_id=cu, dependent_user_id=du, created_at=OLD)


def source(uid: str) -> PortalSource:
    return PortalSource(user_id=uid, status="connected", last_sync_at=OLD)


def welcome(email: str, at: datetime = OLD) -> AuditEvent:
    return AuditEvent(at=at, action="Profile: Welcome Mail Sent", user_id=None, email=email)


def clean_family() -> list[object]:
    """P1 (child) with mother C1 (Joint): users U1 (caregiver) → U2 (patient), linked."""
    return [
        patient("P1"), contact("C1"), fc("P1", "C1"),
        caregiver("U1", "C1"), patient_user("U2", "P1"), link("U1", "U2"), source("U1"),
        welcome("c1@example.org"),
    ]


def snap(*records: object) -> Snapshot:
    return Snapshot.build(records)


class MemorySource:
    """OP and portal readers over a list of records, for engine tests. Read-only."""

    writable = False

    def __init__(self, records: list[object]) -> None:
        self.records = records

    def _of(self, cls: type) -> list[Any]:
        return [r for r in self.records if isinstance(r, cls)]

    def patients(self, since: Any = None) -> Any:
        return iter(self._of(Patient))

    def contacts(self, since: Any = None) -> Any:
        return iter(self._of(Contact))

    def family_contacts(self, since: Any = None) -> Any:
        return iter(self._of(FamilyContact))

    def users(self, since: Any = None) -> Any:
        return iter(self._of(PortalUser))

    def links(self) -> Any:
        return iter(self._of(CaregiverLink))

    def sources(self) -> Any:
        return iter(self._of(PortalSource))

    def audit(self, since: Any = None) -> Any:
        return iter(self._of(AuditEvent))
