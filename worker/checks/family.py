"""Checks on the family-contact links in OP: authority, inactive contacts, Self roles.

These are OP-only: they need no portal data, so they run even on records that changed
a minute ago.
"""

from __future__ import annotations

from collections.abc import Iterator

from worker.checks.base import CheckContext, finding, register
from worker.model.findings import Finding
from worker.model.snapshot import Snapshot


@register("authority_invalid")
def authority_invalid(ctx: CheckContext) -> Iterator[Finding]:
    snap = ctx.snapshot
    for fc in snap.family:
        if not fc.is_parent_role or fc.authority.grants_access:
            continue
        patient = snap.patients.get(fc.patient_id)
        contact = snap.contacts.get(fc.contact_id)
        if patient is None or contact is None or not patient.active or not contact.active:
            continue
        if not contact.email.strip():
            continue
        yield finding(
            "authority_invalid",
            f"{fc.role_reason.strip() or 'Parent'} on chart {fc.patient_id} has authority "
            f"{fc.authority.value}: no portal access and no Welcome email",
            patient_id=fc.patient_id,
            contact_id=fc.contact_id,
        )


@register("contact_inactive")
def contact_inactive(ctx: CheckContext) -> Iterator[Finding]:
    snap = ctx.snapshot
    for fc in snap.family:
        if not fc.authority.grants_access:
            continue
        patient = snap.patients.get(fc.patient_id)
        contact = snap.contacts.get(fc.contact_id)
        if patient is None or contact is None or not patient.active or contact.active:
            continue
        yield finding(
            "contact_inactive",
            f"contact {fc.contact_id} has {fc.authority.value} authority on chart "
            f"{fc.patient_id} but is inactive",
            patient_id=fc.patient_id,
            contact_id=fc.contact_id,
        )


def own_charts(snap: Snapshot) -> Iterator[tuple[str, str]]:
    """(contact_id, patient_id) of every contact who *is* that patient.

    Two things say so: `contacts.patient_id`, and a family-contact row with Role/Reason
    Self on the patient's chart. The guide reads a Self row as "this contact is this
    patient" whatever the contact record says, so either one counts. Only charts that
    exist are returned; each pair once, in the snapshot's order.
    """
    seen: set[tuple[str, str]] = set()
    for own_pid, contacts in snap.contacts_by_patient_id.items():
        if own_pid not in snap.patients:
            continue
        for contact in contacts:
            pair = (contact.contact_id, own_pid)
            if pair not in seen:
                seen.add(pair)
                yield pair
    for fc in snap.family:
        if not fc.is_self or fc.patient_id not in snap.patients:
            continue
        pair = (fc.contact_id, fc.patient_id)
        if pair not in seen and fc.contact_id in snap.contacts:
            seen.add(pair)
            yield pair


def parent_patients(snap: Snapshot) -> Iterator[tuple[str, str]]:
    """(contact_id, own patient_id) of contacts who are patients themselves (see
    `own_charts`) and are authorized on someone else's chart: the parents who need the
    Welcome email and should see themselves too."""
    for cid, own_pid in own_charts(snap):
        for fc in snap.fc_by_contact.get(cid, ()):
            if fc.patient_id != own_pid and snap.is_authorized(fc):
                yield cid, own_pid
                break


def self_role_pairs(ctx: CheckContext) -> list[tuple[str, str]]:
    """(contact, own chart) of parents whose own chart lists them as Self: the Welcome
    email is never sent to them (memoised: welcome_not_sent needs it too)."""
    cached = ctx.memo.get("self_role_pairs")
    if cached is None:
        snap = ctx.snapshot
        cached = [
            (cid, own)
            for cid, own in parent_patients(snap)
            if any(f.contact_id == cid and f.is_self for f in snap.fc_by_patient.get(own, ()))
        ]
        ctx.memo["self_role_pairs"] = cached
    return cached  # type: ignore[return-value]


def self_role_contacts(ctx: CheckContext) -> set[str]:
    """Contacts with a `self_role_pairs` entry: a Welcome resend cannot reach them."""
    return {cid for cid, _ in self_role_pairs(ctx)}


@register("self_role", "self_dependent_missing")
def self_roles(ctx: CheckContext) -> Iterator[Finding]:
    snap = ctx.snapshot
    for cid, own in parent_patients(snap):
        entries = [f for f in snap.fc_by_patient.get(own, ()) if f.contact_id == cid]
        if any(f.is_self for f in entries):
            yield finding(
                "self_role",
                f"contact {cid} is a parent here and also patient {own}, whose chart lists "
                "them with Role/Reason Self: the Welcome email is never sent",
                patient_id=own,
                contact_id=cid,
            )
        elif ctx.blind("family_contacts") or ctx.unknown(own, cid):
            continue  # their own entry may be the row we could not read
        elif not any(f.authority.grants_access for f in entries):
            what = (
                "lists them without Joint/Exclusive authority" if entries
                else "does not list them"
            )
            yield finding(
                "self_dependent_missing",
                f"contact {cid} is a parent here and also patient {own}, whose own chart {what}: "
                "they will not see themselves in the portal",
                patient_id=own,
                contact_id=cid,
            )
