"""Root cause first: which OP-side problem a portal-side fix must wait for.

The guide troubleshoots in one order: the patient's chart in OP (active, no email),
then the parent in OP (active, no duplicate, right authority, no Self role), and only
then the portal (dummy email, links, a source refresh, a Welcome resend). A portal fix
made while the OP records are still wrong cannot work: the portal mirrors OP, so a
source refresh of a child whose chart holds an email is retried at 20, 40 and 80
minutes and escalated, while the step that helps is clearing the email.

**Family**: one patient's chart and the family contacts listed on it. A blocker belongs
to the chart it names (`patient_id`) and to the contact(s) it names (`contact_id`,
`contact_ids`). A portal fix waits while a blocker is open that names
- the fix's chart: any OP-side problem in that chart's family, on the chart itself
  (email, inactive) or on one of its family-contact rows (authority, inactive contact,
  Self); or
- the fix's contact: a problem with that person wherever it is raised (their Self row on
  their own chart, an inactive row, a duplicate record, authority on another chart).

Everything here works on anything with `check`, `patient_id`, `contact_id` and
`contact_ids` (a `Finding` or a state-database row), so the planner and the digest
decide alike. Stale links never wait: ending a privacy leak comes first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from worker.checks.catalog import BY_ID
from worker.checks.remedies import REMEDIES

# OP-side problems that stop a portal fix from working, in the guide's order.
BLOCKERS: tuple[str, ...] = (
    "patient_inactive",
    "patient_email_present",
    "contact_inactive",
    "contact_duplicate",
    "authority_invalid",
    "self_role",
)
# Portal-side fixes that wait for them, and what oprecon does once they are cleared.
WAITS: dict[str, str] = {
    "caregiver_link_missing": "refreshes the parent's portal connection",
    "welcome_not_sent": "resends the Welcome email",
    "portal_patient_email_not_dummy": "sets the portal user's @dummy.com email",
}


def _contacts(item: Any) -> set[str]:
    out = {c for c in (getattr(item, "contact_ids", None) or ()) if c}
    if item.contact_id:
        out.add(item.contact_id)
    return out


class RootCauses:
    """An index of open blockers, asked per portal fix: which one must come first?"""

    def __init__(self, blockers: Iterable[Any]) -> None:
        order = {c: i for i, c in enumerate(BLOCKERS)}
        self.by_chart: dict[str, list[Any]] = {}
        self.by_contact: dict[str, list[Any]] = {}
        for b in sorted(
            (b for b in blockers if b.check in order),
            key=lambda b: (order[b.check], b.patient_id or "", b.contact_id or ""),
        ):
            if b.patient_id:
                self.by_chart.setdefault(b.patient_id, []).append(b)
            for cid in _contacts(b):
                self.by_contact.setdefault(cid, []).append(b)

    def __bool__(self) -> bool:
        return bool(self.by_chart or self.by_contact)

    def blocker_of(self, fix: Any) -> Any | None:
        """The first open blocker in the fix's family (module docstring), or None."""
        if fix.check not in WAITS:
            return None
        found: list[Any] = []
        if fix.patient_id:
            found += self.by_chart.get(fix.patient_id, [])
        if fix.contact_id:
            found += self.by_contact.get(fix.contact_id, [])
        if not found:
            return None
        order = {c: i for i, c in enumerate(BLOCKERS)}
        return min(found, key=lambda b: (order[b.check], b.patient_id or "",
                                         b.contact_id or ""))


def where(item: Any) -> str:
    """'chart P1, contact C2' for a finding or row: ids only, never names."""
    parts = []
    if item.patient_id:
        parts.append(f"chart {item.patient_id}")
    contacts = sorted(_contacts(item))
    if len(contacts) > 1:
        parts.append("contacts " + ", ".join(contacts))
    elif contacts:
        parts.append(f"contact {contacts[0]}")
    return ", ".join(parts) or "this family"


def title(check: str) -> str:
    return BY_ID[check].title if check in BY_ID else check


def wait_reason(fix: Any, blocker: Any) -> str:
    """The planner's reason: what to do instead, in one line."""
    first = REMEDIES.get(blocker.check, ("",))[0]
    return (
        f"root cause first: {blocker.check} ({where(blocker)}) is open and must be fixed "
        f"in OP before this portal fix can work. {first} oprecon "
        f"{WAITS.get(fix.check, 'fixes this')} once it is cleared"
    )


def wait_steps(fix: Any, blocker: Any) -> tuple[str, ...]:
    """The digest's steps for a fix that waits: the blocker's, named as the step to take."""
    return (
        f"Fix the root cause first: {title(blocker.check)} ({where(blocker)}), reported "
        "as an item of its own. Until it is fixed in OP, changing the portal cannot help.",
        *REMEDIES.get(blocker.check, ()),
        f"Nothing else is needed for this item: once that is fixed, oprecon "
        f"{WAITS.get(fix.check, 'fixes this')} by itself and checks the result.",
    )

