"""Cross-system checks on portal users: dummy emails, roles, inactive and orphan records.

Each skips a candidate whose OP record changed within the propagation delay: the portal
may simply not have caught up yet.
"""

from __future__ import annotations

from collections.abc import Iterator

from worker.checks.base import CheckContext, finding, register
from worker.model.findings import Finding
from worker.model.records import PATIENT_ROLE


@register(
    "patient_inactive",
    "portal_patient_email_not_dummy",
    "portal_patient_role_invalid",
    "portal_orphan_user",
)
def portal_users(ctx: CheckContext) -> Iterator[Finding]:
    snap = ctx.snapshot
    for uid, user in snap.users.items():
        if not user.active:
            continue
        patient = snap.patients.get(user.op_patient_id) if user.op_patient_id else None
        contact = snap.contacts.get(user.op_contact_id) if user.op_contact_id else None
        dangling = []
        if user.op_patient_id and patient is None:
            if ctx.blind("patients") or ctx.unknown(patient_id=user.op_patient_id):
                continue  # the patient's row may be there, unreadable
            dangling.append(f"OP patient {user.op_patient_id}")
        if user.op_contact_id and contact is None:
            if ctx.blind("contacts") or ctx.unknown(contact_id=user.op_contact_id):
                continue
            dangling.append(f"OP contact {user.op_contact_id}")
        if dangling or not (user.op_patient_id or user.op_contact_id):
            what = " and ".join(dangling) if dangling else "no OP patient or contact"
            yield finding(
                "portal_orphan_user",
                f"portal user {uid} points to {what}"
                + (" that does not exist" if dangling else ""),
                portal_user_id=uid,
            )
            continue
        if patient is None:
            continue
        if ctx.skip_recent(patient):
            continue
        pid = patient.patient_id
        if not patient.active:
            yield finding(
                "patient_inactive",
                f"patient {pid} is Inactive in OP but portal user {uid} is still active",
                patient_id=pid,
                portal_user_id=uid,
            )
            continue
        if user.role.strip().lower() != PATIENT_ROLE.lower():
            yield finding(
                "portal_patient_role_invalid",
                f"portal user {uid} of patient {pid} has role {user.role or '(blank)'}, "
                "not Patient",
                patient_id=pid,
                portal_user_id=uid,
            )
        elif not user.has_dummy_email:
            yield finding(
                "portal_patient_email_not_dummy",
                f"portal user {uid} of patient {pid} has an email outside @dummy.com",
                patient_id=pid,
                portal_user_id=uid,
            )
