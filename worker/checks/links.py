"""Caregiver/dependent links: missing ones block a parent, stale ones leak a child's record.

A stale link is the one privacy problem in the catalog, hence high severity.
"""

from __future__ import annotations

from collections.abc import Iterator

from worker.checks.base import CheckContext, finding, register
from worker.model.findings import Finding


@register("caregiver_link_missing")
def caregiver_link_missing(ctx: CheckContext) -> Iterator[Finding]:
    snap = ctx.snapshot
    if ctx.blind("portal_links"):
        return  # an unreadable link row may be the very link "missing" here
    for fc in ctx.granting():
        patient = snap.patients[fc.patient_id]
        caregivers = snap.active_users_for_contact(fc.contact_id)
        dependents = snap.active_users_for_patient(fc.patient_id)
        if not caregivers or not dependents:
            continue
        contact = snap.contacts[fc.contact_id]
        for cu in caregivers:
            linked = snap.links_by_caregiver.get(cu.user_id, ())
            for du in dependents:
                if du.user_id in linked or ctx.unknown(user_id=du.user_id):
                    continue
                if ctx.skip_recent(patient, contact, fc):
                    continue
                yield finding(
                    "caregiver_link_missing",
                    f"contact {fc.contact_id} (portal user {cu.user_id}) is authorized on "
                    f"chart {fc.patient_id} but the portal does not link them to dependent "
                    f"user {du.user_id}",
                    patient_id=fc.patient_id,
                    contact_id=fc.contact_id,
                    portal_user_id=cu.user_id,
                )


@register("caregiver_link_stale")
def caregiver_link_stale(ctx: CheckContext) -> Iterator[Finding]:
    """Also a link whose caregiver's OP contact is gone (deleted, or merged away): OP
    authorizes nobody through a contact it no longer has, so the portal shows the child
    to someone it should not, which is the same privacy problem as withdrawn authority.
    Likewise a link to a dependent whose OP patient is gone: OP authorizes nobody for a
    chart it no longer has. A contact or patient whose row could not be read is
    unknown, not gone: no conclusion then."""
    snap = ctx.snapshot
    if ctx.blind("family_contacts"):
        return  # an unreadable row may be the very authorization that looks absent
    authorized = ctx.authorized_pairs()
    unreadable = ctx.unreadable_contacts()
    for cu_id, du_id in ctx.sorted_links():
        cu = snap.users.get(cu_id)
        du = snap.users.get(du_id)
        if cu is None or du is None or not cu.active or not du.active:
            continue
        if not cu.op_contact_id or not du.op_patient_id:
            continue
        contact = snap.contacts.get(cu.op_contact_id)
        patient = snap.patients.get(du.op_patient_id)
        if patient is None:
            if (ctx.blind("patients") or ctx.unknown(patient_id=du.op_patient_id)
                    or (contact is not None and ctx.skip_recent(contact))):
                continue  # a patients row without a readable id may be this very chart
            yield finding(
                "caregiver_link_stale",
                f"portal user {cu_id} can still see dependent user {du_id}, but that "
                f"user's OP patient {du.op_patient_id} no longer exists (deleted or merged)",
                patient_id=du.op_patient_id,
                contact_id=cu.op_contact_id,
                portal_user_id=cu_id,
            )
            continue
        if not patient.active:
            continue  # inactive patients have a check of their own
        if contact is None:
            if (ctx.blind("contacts") or cu.op_contact_id in unreadable
                    or ctx.skip_recent(patient)):
                continue  # a contacts row without a readable id may be this very contact
            yield finding(
                "caregiver_link_stale",
                f"portal user {cu_id} can still see patient {patient.patient_id}, but their "
                f"OP contact {cu.op_contact_id} no longer exists (deleted or merged)",
                patient_id=patient.patient_id,
                contact_id=cu.op_contact_id,
                portal_user_id=cu_id,
            )
            continue
        if (patient.patient_id, contact.contact_id) in authorized:
            continue
        if ctx.unknown(patient.patient_id, contact.contact_id, du_id):
            ctx.suppressed_unknown += 1
            continue
        fcs = [
            f for f in snap.fc_by_patient.get(patient.patient_id, ())
            if f.contact_id == contact.contact_id
        ]
        if ctx.skip_recent(patient, contact, *fcs):
            continue
        yield finding(
            "caregiver_link_stale",
            f"portal user {cu_id} (contact {contact.contact_id}) can still see patient "
            f"{patient.patient_id}, whom OP no longer authorizes them for",
            patient_id=patient.patient_id,
            contact_id=contact.contact_id,
            portal_user_id=cu_id,
        )
