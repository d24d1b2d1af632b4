"""invalid_record: rows a source could not parse, and portal links to unknown users.

A bad row is reported and skipped; the rest of the source still reconciles. What the
row describes is *unknown* for the run (worker.model.snapshot.Unknowns), and the finding
says so, so staff know which family oprecon could not compare this time. A file with
too large a share of unreadable rows gets one alert instead of one per row, and the run
plans no fixes (worker.scan.engine).
"""

from __future__ import annotations

from collections.abc import Iterator

from worker.checks.base import CheckContext, finding, register
from worker.model.findings import Finding, Severity
from worker.model.records import InvalidRecord


def _where(rec: InvalidRecord) -> str:
    if rec.line is None:
        return rec.source
    if "last_line" in rec.extra:
        return f"{rec.source} lines {rec.line}-{rec.extra['last_line']}"
    return f"{rec.source} line {rec.line}"


def _key(rec: InvalidRecord) -> str:
    """A file's line number is stable for that file; a table's row position is not (rows
    come and go), so there the row's ids and the reason identify it."""
    if rec.line is not None and rec.source.endswith(".csv"):
        return f"{rec.source}:{rec.line}"
    return f"{rec.source}:{rec.reason}"


def unknown_note(rec: InvalidRecord) -> str:
    """What the run does not know because of this row, in words staff can act on."""
    if rec.table is None:
        return ""
    pid, cid, uid = rec.patient_id, rec.contact_id, rec.portal_user_id
    dep = rec.extra.get("dependent_user_id")
    if rec.table == "portal_audit":
        return "; Welcome emails are not checked this run"
    if rec.rows > 1:
        named = len(rec.recovered) + (1 if (pid or cid or uid) else 0)
        return (f"; {rec.rows} row(s) unreadable ({named} identified): no portal "
                "comparison for them this run")
    if rec.table == "family_contacts" and pid and cid:
        what = f"the family contact of contact {cid} on chart {pid}"
    else:
        parts = []
        if pid:
            parts.append(f"patient {pid}")
        if cid:
            parts.append(f"contact {cid}")
        if uid:
            parts.append(f"portal user {uid}")
        if dep:
            parts.append(f"portal user {dep}")
        if not parts:
            return "; no id could be read: nothing is concluded from a missing row of this file"
        what = " and ".join(parts)
    return f"; {what} is unknown this run: not compared with the portal"


@register("invalid_record")
def invalid_record(ctx: CheckContext) -> Iterator[Finding]:
    snap = ctx.snapshot
    over = ctx.over_limit()
    firsts: dict[str, list[InvalidRecord]] = {}
    for rec in snap.invalid:
        if rec.table is not None and rec.table in over:
            firsts.setdefault(rec.table, []).append(rec)
            continue
        yield finding(
            "invalid_record",
            f"{_where(rec)}: {rec.reason}{unknown_note(rec)}",
            patient_id=rec.patient_id,
            contact_id=rec.contact_id,
            portal_user_id=rec.portal_user_id,
            key_extra=_key(rec),
        )
    measured = ctx.files
    for table, (bad, total) in over.items():
        fresh = table in ctx.measured_over()
        # A run that streamed the file outside its snapshot saw its first bad rows there.
        recs = ((measured.examples.get(table) if measured and fresh else None)
                or firsts.get(table, []))
        source = recs[0].source if recs else table
        examples = "; ".join(f"{_where(r)}: {r.reason}" for r in recs[:3])
        share = (f"at least {bad} of {total} rows ({100.0 * bad / total:.1f}%) cannot be "
                 "read (counted among the rows changed since the last scan)"
                 if fresh and measured is not None and measured.lower_bound else
                 f"{bad} of {total} rows ({100.0 * bad / total:.1f}%) cannot be read")
        yield finding(
            "invalid_record",
            f"{source}: {share}, over the {ctx.unreadable_percent:g}% limit "
            "(unreadable_alert_percent): no fixes are planned this run and no finding is "
            f"resolved{f'. First: {examples}' if examples else ''}",
            severity=Severity.HIGH,
            key_extra=f"file:{table}",
            data={"file": table},
        )
    users = snap.users
    if ctx.blind("portal_users"):
        return
    for cu, du in ctx.sorted_links():
        if cu in users and du in users:
            continue
        missing = [u for u in (cu, du) if u not in users and not ctx.unknown(user_id=u)]
        if missing:
            yield finding(
                "invalid_record",
                f"portal_links: link {cu} -> {du} names unknown portal user(s) "
                f"{', '.join(missing)}",
                portal_user_id=cu,
                key_extra=f"portal_links:{cu}->{du}",
            )
