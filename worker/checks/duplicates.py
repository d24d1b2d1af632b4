"""contact_duplicate: one finding per group of contact records that are one person."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from worker.checks.base import CheckContext, finding, register
from worker.matching.duplicates import find_duplicate_groups
from worker.model.findings import Finding
from worker.model.records import Contact


def duplicate_findings(contacts: Iterable[Contact]) -> Iterator[Finding]:
    """Also used by `oprecon duplicates` on a bare contacts export."""
    for group in find_duplicate_groups(contacts):
        ids = tuple(sorted(group.contact_ids))
        yield finding(
            "contact_duplicate",
            f"{len(ids)} contact records look like one person ({', '.join(group.reasons)}; "
            f"score {group.score:.2f}): {', '.join(ids)}",
            contact_id=ids[0],
            contact_ids=ids,
        )


@register("contact_duplicate")
def contact_duplicate(ctx: CheckContext) -> Iterator[Finding]:
    return duplicate_findings(ctx.snapshot.contacts.values())
