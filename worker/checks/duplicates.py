"""contact_duplicate: one finding per group of contact records that are one person.

The detail says why the records matched (the fields that agreed, e.g. "nickname, same
last name, same email") and the group's weakest match probability, so staff can judge
before *Merge Contacts*. See worker/matching/duplicates.py for how groups are found.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator

from worker.checks.base import CheckContext, finding, register
from worker.matching.duplicates import (
    DEFAULT_THRESHOLD,
    DuplicateGroup,
    DuplicateStats,
    find_duplicate_groups,
)
from worker.matching.index import KeyIndex, Learned
from worker.model.findings import Finding
from worker.model.records import Contact


def duplicate_findings(
    contacts: Iterable[Contact], threshold: float = DEFAULT_THRESHOLD,
    focus: Collection[str] | None = None, learned: list[Learned] | None = None,
) -> Iterator[Finding]:
    """Also used by `oprecon duplicates` on a bare contacts export, and by incremental
    scans (`focus`: only the groups holding one of those contacts). `learned`, when
    given, receives the parameters learned and every contact's blocking keys, for
    incremental scans to come (worker.matching.index)."""
    if learned is None:
        return group_findings(find_duplicate_groups(contacts, threshold, focus=focus))
    stats = DuplicateStats()
    keys: list[KeyIndex] = []
    groups = find_duplicate_groups(contacts, threshold, focus=focus, stats=stats,
                                   on_columns=lambda cols: keys.append(
                                       KeyIndex.from_columns(cols)))
    if stats.model is not None and keys:
        learned.append(Learned(stats.model, keys[0]))
    return group_findings(groups)


def group_findings(groups: Iterable[DuplicateGroup]) -> Iterator[Finding]:
    """One `contact_duplicate` finding per group."""
    for group in groups:
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
    """A full scan compares every contact (and, asked to, keeps what it learned for
    incremental scans: `ctx.learned_duplicates`); an incremental one has already decided
    the groups of its changed contacts (`Snapshot.duplicate_findings`)."""
    decided = ctx.snapshot.duplicate_findings
    if decided is not None:
        return iter(decided)
    learned = ctx.learned_duplicates if ctx.keep_duplicate_index else None
    return duplicate_findings(ctx.snapshot.contacts.values(), ctx.duplicate_threshold,
                              learned=learned)
