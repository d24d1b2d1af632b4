"""What was seen and done, for on-call and audits: a family's timeline (`oprecon history
ID`), what oprecon changed in the portal (`oprecon fixes applied`), and the spreadsheet
export of findings (`oprecon findings --csv`).

All of it reads what the state database already holds (finding_events, actions): ids,
checks, states, causes, run ids and outcomes; never a name, email or phone.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import IO, Any

from sqlalchemy import func, or_, select

from config.settings import Settings
from worker.cli.errors import CannotStart
from worker.model.text import scrub_text
from worker.state.models import ActionRow, ActionStatus, FindingEvent, FindingRow

# -- findings --csv -----------------------------------------------------------------------

CSV_COLUMNS = ("fingerprint", "check", "severity", "state", "patient_id", "contact_id",
               "portal_user_id", "contact_ids", "detail", "first_seen_at", "last_seen_at",
               "next_check_at", "fix_attempts", "silenced_until", "silence_reason")
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection):
# such a cell gets a leading apostrophe, which spreadsheets show as text.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def write_csv(rows: Iterable[dict[str, Any]], out: IO[str]) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        cells = []
        for column in CSV_COLUMNS:
            value = row.get(column)
            if isinstance(value, list):
                value = " ".join(str(v) for v in value)
            cells.append(safe_cell(value))
        writer.writerow(cells)


def involves(ids: Iterable[str]) -> Any:
    """SQL condition: a finding about any of these patient, contact or portal user ids
    (duplicate groups list their contacts in `contact_ids`, checked by the caller)."""
    wanted = list(ids)
    return or_(FindingRow.patient_id.in_(wanted), FindingRow.contact_id.in_(wanted),
               FindingRow.portal_user_id.in_(wanted), FindingRow.check == "contact_duplicate")


def row_involves(row: FindingRow, ids: set[str]) -> bool:
    return bool({row.patient_id, row.contact_id, row.portal_user_id} & ids) or bool(
        set(row.contact_ids or ()) & ids)


# -- history ID -----------------------------------------------------------------------------


def _stamp(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%SZ") if when else ""


def family_ids(session: Any, practice: str, target: str) -> set[str]:
    """The id asked for, plus, for a patient, the contacts and portal users its findings
    name (so the timeline shows the family, not only rows keyed on the chart)."""
    ids = {target}
    rows = session.execute(select(FindingRow.contact_id, FindingRow.portal_user_id).where(
        FindingRow.practice == practice, FindingRow.patient_id == target))
    for contact_id, user_id in rows:
        ids.update(i for i in (contact_id, user_id) if i)
    return ids


def timeline(session: Any, settings: Settings, target: str) -> list[dict[str, Any]]:
    practice = settings.practice
    ids = family_ids(session, practice, target)
    findings = {
        r.id: r for r in session.scalars(
            select(FindingRow).where(FindingRow.practice == practice, involves(ids)))
        if row_involves(r, ids)
    }
    if not findings:
        return []
    entries: list[dict[str, Any]] = []
    for event in session.scalars(select(FindingEvent).where(
            FindingEvent.finding_id.in_(list(findings)))):
        f = findings[event.finding_id]
        entries.append({
            "at": event.at, "kind": "event", "fingerprint": f.fingerprint, "check": f.check,
            "from": event.from_state, "to": event.to_state, "run_id": event.run_id,
            "what": scrub_text(event.cause),
        })
    for action in session.scalars(select(ActionRow).where(
            ActionRow.finding_id.in_(list(findings)))):
        f = findings[action.finding_id]
        when = action.applied_at or action.created_at
        outcome = str(action.status)
        what = f"fix {action.kind} (action {action.id}): {outcome}"
        if action.attempts:
            what += f" after {action.attempts} attempt(s)"
        if action.error:
            what += f": {scrub_text(action.error)}"
        entries.append({
            "at": when, "kind": "fix", "fingerprint": f.fingerprint, "check": f.check,
            "from": None, "to": outcome, "run_id": action.run_id, "what": what,
        })
    entries.sort(key=lambda e: (e["at"], 0 if e["kind"] == "event" else 1))
    return entries


def show_history(settings: Settings, target: str, as_json: bool, out: IO[str],
                 sessions: Any) -> None:
    from worker.scan.report import table

    with sessions() as session:
        entries = timeline(session, settings, target)
    if not entries:
        raise CannotStart(f"nothing recorded about {target}: no finding names that patient, "
                          "contact or portal user id")
    if as_json:
        for e in entries:
            out.write(json.dumps({**e, "at": e["at"].isoformat()}) + "\n")
        return
    out.write(table(
        ["at", "check", "change", "run", "what", "fingerprint"],
        [(_stamp(e["at"]), e["check"],
          f"{e['from'] or '·'} → {e['to']}" if e["kind"] == "event" else "fix",
          e["run_id"] or "", e["what"], e["fingerprint"]) for e in entries],
    ) + "\n")
    checks = len({e["fingerprint"] for e in entries})
    out.write(f"{len(entries)} entries about {target} and its family, {checks} finding(s); "
              "times in UTC\n")


# -- fixes applied ---------------------------------------------------------------------------

# Outcomes of a portal change oprecon made or tried (staged/rejected/deferred never ran).
APPLIED_STATUSES = (ActionStatus.APPLIED, ActionStatus.ALREADY, ActionStatus.FAILED,
                    ActionStatus.RETRYING, ActionStatus.INTENT, ActionStatus.UNAVAILABLE)


def applied_fixes(session: Any, settings: Settings, since: datetime) -> list[dict[str, Any]]:
    when = func.coalesce(ActionRow.applied_at, ActionRow.created_at)
    rows = session.execute(
        select(ActionRow, FindingRow).join(FindingRow, FindingRow.id == ActionRow.finding_id)
        .where(ActionRow.practice == settings.practice,
               ActionRow.status.in_([str(s) for s in APPLIED_STATUSES]), when >= since)
        .order_by(when, ActionRow.id)).all()
    return [{
        "action_id": a.id, "at": (a.applied_at or a.created_at).isoformat(),
        "applied": a.applied_at is not None, "fix": a.kind, "outcome": str(a.status),
        "attempts": a.attempts, "run_id": a.run_id, "check": f.check,
        "fingerprint": f.fingerprint, "patient_id": f.patient_id, "contact_id": f.contact_id,
        "portal_user_id": f.portal_user_id, "finding_state": f.state,
        "error": scrub_text(a.error) if a.error else None,
    } for a, f in rows]


def show_applied(settings: Settings, since: datetime, as_json: bool, out: IO[str],
                 sessions: Any, now: datetime) -> None:
    from worker.scan.report import table

    with sessions() as session:
        fixes = applied_fixes(session, settings, since)
    if as_json:
        for fix in fixes:
            out.write(json.dumps(fix) + "\n")
        return
    if not fixes:
        out.write(f"no portal changes since {_stamp(since)}\n")
        return
    ids = (("patient", "patient_id"), ("contact", "contact_id"), ("user", "portal_user_id"))
    out.write(table(
        ["at", "action", "fix", "outcome", "attempts", "check", "ids", "finding", "run",
         "error"],
        [(_stamp(datetime.fromisoformat(f["at"])), f["action_id"], f["fix"], f["outcome"],
          f["attempts"], f["check"],
          " ".join(f"{label}={f[key]}" for label, key in ids if f[key]),
          f["finding_state"], f["run_id"] or "", f["error"] or "") for f in fixes],
    ) + "\n")
    by: dict[str, int] = {}
    for f in fixes:
        by[f["outcome"]] = by.get(f["outcome"], 0) + 1
    counts = ", ".join(f"{k} {v}" for k, v in sorted(by.items()))
    out.write(f"{len(fixes)} portal change(s) since {_stamp(since)}: {counts}\n")


def parse_since(value: str | None, now: datetime) -> datetime:
    """--since: an ISO date or time, or a span back from now (7d, 12h, 30m)."""
    if not value:
        return now - timedelta(days=7)
    units = {"d": "days", "h": "hours", "m": "minutes"}
    if value[-1:] in units and value[:-1].isdigit():
        return now - timedelta(**{units[value[-1]]: int(value[:-1])})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise CannotStart(f"--since: an ISO 8601 date or time, or a span like 7d, 12h, 30m: "
                          f"{value}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=now.tzinfo)
