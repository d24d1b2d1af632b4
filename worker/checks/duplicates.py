"""contact_duplicate: one finding per group of contact records that are one person."""

from __future__ import annotations

from collections.abc import Iterator

from worker.checks.base import CheckContext, finding, register
from worker.duplicates import find_duplicate_groups
from worker.findings import Finding


@register("contact_duplicate")
def contact_duplicate(ctx: CheckContext) -> Iterator[Finding]:
    for group in find_duplicate_groups(ctx.snapshot.contacts.values()):
        ids = tuple(sorted(group.contact_ids))
        yield finding(
            "contact_duplicate",
            f"{len(ids)} contact records look like one person ({', '.join(group.reasons)}; "
            f"score {group.score:.2f}): {', '.join(ids)}",
            contact_id=ids[0],
            contact_ids=ids,
        )
