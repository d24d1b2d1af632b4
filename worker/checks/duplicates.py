"""contact_duplicate: one finding per group of contact records that are one person.

The detail says why the records matched (the fields that agreed, e.g. "nickname, same
last name, same email") and the group's weakest match probability, so staff can judge
before *Merge Contacts*. See worker/matching/duplicates.py for how groups are found.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator

from worker.checks.base import CheckContext, finding, register
from worker.matching.duplicates import DEFAULT_THRESHOLD, find_duplicate_groups
from worker.model.findings import Finding
from worker.model.records import Contact


def duplicate_findings(
    contacts: Iterable[Contact], threshold: float = DEFAULT_THRESHOLD,
    focus: Collection[str] | None = None,
) -> Iterator[Finding]:
    """Also used by `oprecon duplicates` on a bare contacts export, and by incremental
    scans (`focus`: only the groups holding one of those contacts)."""
    for group in find_duplicate_groups(contacts, threshold, focus=focus):
        ids = tuple(sorted(group.contact_ids))
        yield finding(
            "contact_duplicate",
            f"{len(ids)} contact records look like one person ({', '.join(group.reasons)}; "
            f"match probability {group.score:.2f}): {', '.join(ids)}",
            contact_id=ids[0],
            contact_ids=ids,
        )


@register("contact_duplicate")
def contact_duplicate(ctx: CheckContext) -> Iterator[Finding]:
    """A full scan compares every contact; an incremental one has already compared its
    changed contacts with every contact of the practice (`Snapshot.duplicate_findings`)."""
    decided = ctx.snapshot.duplicate_findings
    if decided is not None:
        return iter(decided)
    return duplicate_findings(ctx.snapshot.contacts.values(), ctx.duplicate_threshold)
