"""invalid_record: rows a source could not parse, and portal links to unknown users.

A bad row is reported and skipped; the rest of the source still reconciles.
"""

from __future__ import annotations

from collections.abc import Iterator

from worker.checks.base import CheckContext, finding, register
from worker.model.findings import Finding
from worker.model.records import InvalidRecord


def _where(rec: InvalidRecord) -> str:
    return f"{rec.source} line {rec.line}" if rec.line is not None else rec.source


def _key(rec: InvalidRecord) -> str:
    """A file's line number is stable for that file; a table's row position is not (rows
    come and go), so there the row's ids and the reason identify it."""
    if rec.line is not None and rec.source.endswith(".csv"):
        return f"{rec.source}:{rec.line}"
    return f"{rec.source}:{rec.reason}"


@register("invalid_record")
def invalid_record(ctx: CheckContext) -> Iterator[Finding]:
    snap = ctx.snapshot
    for rec in snap.invalid:
        yield finding(
            "invalid_record",
            f"{_where(rec)}: {rec.reason}",
            patient_id=rec.patient_id,
            contact_id=rec.contact_id,
            portal_user_id=rec.portal_user_id,
            key_extra=_key(rec),
        )
    users = snap.users
    for cu, du in ctx.sorted_links():
        if cu in users and du in users:
            continue
        missing = [u for u in (cu, du) if u not in users]
        if missing:
            yield finding(
                "invalid_record",
                f"portal_links: link {cu} -> {du} names unknown portal user(s) "
                f"{', '.join(missing)}",
                portal_user_id=cu,
                key_extra=f"portal_links:{cu}->{du}",
            )
