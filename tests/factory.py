"""Tiny builders for hand-made practices in tests: defaults are a clean family."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from worker.model.records import (
    AuditEvent,
    Authority,
    CaregiverLink,
    Contact,
    FamilyContact,
    Patient,
    PortalSource,
    PortalUser,
)
from worker.model.snapshot import Snapshot

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


class MemoryPortal(MemorySource):
    """A writable in-process portal for state-machine tests; changes apply at once.

    End-to-end tests use the HTTP simulator instead (real delay, real HTTP)."""

    writable = True

    def __init__(self, records: list[object],
                 links_after_refresh: dict[str, list[str]] | None = None,
                 fail_with: Exception | None = None) -> None:
        super().__init__(records)
        self.links_after_refresh = links_after_refresh or {}
        self.fail_with = fail_with
        self.calls: list[tuple[str, str, str]] = []

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    def get_user(self, user_id: str) -> PortalUser | None:
        return next((u for u in self._of(PortalUser) if u.user_id == user_id), None)

    def set_user_email(self, user_id: str, email: str, idempotency_key: str) -> None:
        self._maybe_fail()
        self.calls.append(("set_user_email", user_id, idempotency_key))
        from dataclasses import replace

        self.records = [replace(r, email=email) if isinstance(r, PortalUser)
                        and r.user_id == user_id else r for r in self.records]

    def refresh_source(self, user_id: str, idempotency_key: str) -> None:
        self._maybe_fail()
        self.calls.append(("refresh_source", user_id, idempotency_key))
        for du in self.links_after_refresh.get(user_id, []):
            self.records.append(link(user_id, du))

    def resend_welcome(self, contact_id: str, email: str, idempotency_key: str) -> None:
        self._maybe_fail()
        self.calls.append(("resend_welcome", contact_id, idempotency_key))
        from datetime import datetime as _dt

        self.records.append(welcome(email, at=_dt.now(UTC)))
