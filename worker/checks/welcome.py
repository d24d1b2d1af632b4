"""welcome_not_sent: an authorized parent who never got (or lost) their Welcome email.

Resending is the fix the guide gives, except when a Self role on the parent's own chart
blocks the email: then a resend is pointless and staff are alerted instead.
"""

from __future__ import annotations

from collections.abc import Iterator

from worker.checks.base import CheckContext, email_is_valid, finding, register
from worker.checks.family import self_role_contacts
from worker.model.findings import Action, Finding


@register("welcome_not_sent")
def welcome_not_sent(ctx: CheckContext) -> Iterator[Finding]:
    snap = ctx.snapshot
    if ctx.blind("portal_users", "portal_audit"):
        return  # the account or the Welcome event may be in a row we could not read
    blocked = self_role_contacts(ctx)
    since = ctx.now - ctx.welcome_window
    for cid, contact in snap.contacts.items():
        if not contact.active:
            continue
        fcs = ctx.charts_of(cid)
        if not fcs:
            continue
        email = contact.email.strip()
        if not email or not email_is_valid(email):
            continue
        if snap.active_users_for_contact(cid):
            continue
        sent = snap.welcome_sent.get(email.lower())
        if sent is not None and sent >= since:
            continue
        if ctx.skip_recent(contact, *fcs, *(snap.patients[fc.patient_id] for fc in fcs)):
            continue
        if cid in blocked:
            yield finding(
                "welcome_not_sent",
                f"contact {cid} has no portal account and no recent Welcome email; a resend "
                "will not go out until the Self role on their own chart is fixed",
                action=Action.ALERT,
                contact_id=cid,
            )
        else:
            yield finding(
                "welcome_not_sent",
                f"contact {cid} is authorized but has no portal account and no Welcome email "
                "in the window",
                contact_id=cid,
                data={"email": email},
            )
