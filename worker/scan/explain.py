"""What on-call sees first for one record: the facts the support guide asks staff to
check, read off the snapshot, as ids and flags only (no names or emails)."""

from __future__ import annotations

from typing import Any

from worker.checks.base import email_is_valid
from worker.model.records import Contact
from worker.model.snapshot import Snapshot


def _email_state(email: str) -> str:
    value = email.strip()
    if not value:
        return "no email"
    return "valid email" if email_is_valid(value) else "malformed email"


def _users(snap: Snapshot, users: list, kind: str) -> str:
    if not users:
        return f"no {kind} portal user"
    parts = []
    for u in users:
        flags = [u.role or "no role", "active" if u.active else "INACTIVE"]
        if kind == "patient":
            flags.append("dummy email" if u.has_dummy_email else "REAL email")
        parts.append(f"{u.user_id} ({', '.join(flags)})")
    return f"{kind} portal user(s): " + "; ".join(parts)


def describe_contact(snap: Snapshot, contact: Contact) -> list[str]:
    lines = [
        f"contact {contact.contact_id}: {'active' if contact.active else 'INACTIVE'}, "
        f"{_email_state(contact.email)}"
        + (f", also patient {contact.patient_id}" if contact.patient_id else ""),
        "  " + _users(snap, snap.users_by_contact.get(contact.contact_id, []), "caregiver"),
    ]
    for fc in snap.fc_by_contact.get(contact.contact_id, ()):
        lines.append(
            f"  on chart {fc.patient_id} as {fc.role_reason.strip() or '(no role)'}, authority "
            f"{fc.authority.value}{' (authorized)' if snap.is_authorized(fc) else ''}"
        )
    return lines


def describe(snap: Snapshot, kind: str, target: str) -> list[str]:
    """Facts about a patient's chart and family, or a contact and their charts."""
    if kind == "contact":
        contact = snap.contacts.get(target)
        return describe_contact(snap, contact) if contact else [f"contact {target} is not in OP"]
    patient = snap.patients.get(target)
    if patient is None:
        return [f"patient {target} is not in OP"]
    email = (
        "present (must be blank or N/A for a dependent)" if patient.has_real_email
        else "blank or N/A"
    )
    lines = [
        f"patient {target}: {patient.status or 'no status'}, chart email {email}",
        "  " + _users(snap, snap.users_by_patient.get(target, []), "patient"),
    ]
    dependents = {u.user_id for u in snap.users_by_patient.get(target, [])}
    for fc in snap.fc_by_patient.get(target, ()):
        contact = snap.contacts.get(fc.contact_id)
        head = (
            f"family contact {fc.contact_id} as {fc.role_reason.strip() or '(no role)'}, "
            f"authority {fc.authority.value}"
        )
        if contact is None:
            lines.append(f"{head}: contact record missing in OP")
            continue
        state = "active" if contact.active else "INACTIVE"
        lines.append(f"{head}, {state}, {_email_state(contact.email)}")
        for u in snap.users_by_contact.get(fc.contact_id, []):
            linked = snap.links_by_caregiver.get(u.user_id, set()) & dependents
            lines.append(
                f"  caregiver user {u.user_id} ({'active' if u.active else 'INACTIVE'}): "
                + (f"linked to {', '.join(sorted(linked))}" if linked else "NOT linked to "
                   "this patient")
            )
    return lines


def email_state(email: str) -> str:
    """"none", "valid" or "malformed": what the guide asks staff to check, never the address."""
    return {"no email": "none", "valid email": "valid"}.get(_email_state(email), "malformed")


def family_facts(snap: Snapshot, patient_id: str, *, names: bool = False
                 ) -> dict[str, Any] | None:
    """The guide's checklist for one family as data, for the console's family page: the
    chart, every family contact (role, authority, authorized, active, email present and
    valid), their portal users, links to this patient and portal sources. Names only when
    asked (pages behind a login, per setting); never an email address. None when the
    patient is not in OP."""
    patient = snap.patients.get(patient_id)
    if patient is None:
        return None

    def user_row(u: Any) -> dict[str, Any]:
        source = snap.sources.get(u.user_id)
        return {"user_id": u.user_id, "role": u.role or "", "active": u.active,
                "dummy_email": u.has_dummy_email,
                "source": source.status if source else None}

    patient_users = snap.users_by_patient.get(patient_id, [])
    dependents = {u.user_id for u in patient_users}
    contacts = []
    for fc in snap.fc_by_patient.get(patient_id, ()):
        contact = snap.contacts.get(fc.contact_id)
        users = []
        for u in snap.users_by_contact.get(fc.contact_id, []):
            row = user_row(u)
            row["linked"] = bool(snap.links_by_caregiver.get(u.user_id, set()) & dependents)
            users.append(row)
        contacts.append({
            "contact_id": fc.contact_id,
            "name": f"{contact.first_name} {contact.last_name}".strip()
            if names and contact else None,
            "role": fc.role_reason.strip(),
            "authority": fc.authority.value,
            "authorized": snap.is_authorized(fc),
            "in_op": contact is not None,
            "active": contact.active if contact else None,
            "email": email_state(contact.email) if contact else None,
            "also_patient": contact.patient_id if contact else None,
            "users": users,
        })
    return {
        "patient_id": patient_id,
        "name": f"{patient.first_name} {patient.last_name}".strip() if names else None,
        "status": patient.status or "",
        "chart_email": "present" if patient.has_real_email else "blank or N/A",
        "users": [user_row(u) for u in patient_users],
        "contacts": contacts,
    }
