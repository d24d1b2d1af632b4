"""OP-only checks on emails: the contact's (must be usable) and the child's (must be blank)."""

from __future__ import annotations

from collections.abc import Iterator

from worker.checks.base import CheckContext, email_is_valid, finding, register
from worker.model.findings import Finding, Severity


@register("contact_email_invalid")
def contact_email_invalid(ctx: CheckContext) -> Iterator[Finding]:
    snap = ctx.snapshot
    for cid, contact in snap.contacts.items():
        fcs = ctx.charts_of(cid)
        if not fcs:
            continue
        charts = sorted(fc.patient_id for fc in fcs)
        email = contact.email.strip()
        if not email:
            yield finding(
                "contact_email_invalid",
                f"contact {cid} is authorized on chart(s) {', '.join(charts)} but has no email",
                severity=Severity.INFO,
                contact_id=cid,
            )
        elif not email_is_valid(email):
            yield finding(
                "contact_email_invalid",
                f"contact {cid} is authorized on chart(s) {', '.join(charts)} but the email "
                "is not a valid address",
                severity=Severity.WARNING,
                contact_id=cid,
            )


@register("patient_email_present")
def patient_email_present(ctx: CheckContext) -> Iterator[Finding]:
    snap = ctx.snapshot
    for pid, patient in snap.patients.items():
        if not patient.active or not patient.has_real_email:
            continue
        if any(snap.is_authorized(fc) for fc in snap.fc_by_patient.get(pid, ())):
            yield finding(
                "patient_email_present",
                f"chart {pid} is a dependent but holds an email address: it will not appear "
                "under the parent's portal account",
                patient_id=pid,
            )
