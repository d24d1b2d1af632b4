"""What each page shows, read from the state database (and the sources for the family
page's checklist) through the same functions the CLI uses."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import String, cast, func, or_, select
from sqlalchemy.orm import Session

from config.settings import Settings, SettingsError
from worker.checks.catalog import BY_ID, CHECK_IDS
from worker.checks.remedies import REMEDIES
from worker.runtime import health
from worker.runtime.operations import Waits, collect_status, effective_state, next_check
from worker.state.models import AuditEntry, FindingEvent, FindingRow, Run
from worker.state.models import FindingState as S

PAGE_SIZE = 50
FAMILIES_SHOWN = 12
SEVERITIES = ("high", "warning", "info")
STATES = ("unresolved", *[str(s) for s in S], "all")
AGES = {"": None, "1h": timedelta(hours=1), "1d": timedelta(days=1),
        "7d": timedelta(days=7), "30d": timedelta(days=30)}


def local(when: datetime | None, tz: ZoneInfo) -> str:
    return when.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z") if when else ""


def age_text(when: datetime, now: datetime) -> str:
    return health.fmt_seconds(max(0.0, (now - when).total_seconds()))


# -- dashboard -----------------------------------------------------------------------------


def dashboard(settings: Settings, session: Session, now: datetime) -> dict[str, Any]:
    """Health of each part with the last error's cause, last runs, open findings by check
    and severity, staged batches and the pause switch."""
    from worker.fixes.staging import staged_batches

    checks = [c.to_json() for c in health.cluster_checks(settings, now)]
    status = collect_status(settings, now)
    last_failed = session.scalar(
        select(Run).where(Run.practice == settings.practice, Run.status == "failed")
        .order_by(Run.started_at.desc(), Run.id.desc()).limit(1))
    last_run = session.scalar(
        select(Run).where(Run.practice == settings.practice)
        .order_by(Run.started_at.desc(), Run.id.desc()).limit(1))
    sources_ok = last_run is None or last_run.status != "failed"
    source_detail = (
        "no run yet" if last_run is None
        else f"last run {last_run.id} ({last_run.kind}) {last_run.status}")
    if last_failed is not None:
        cause = (last_failed.error or "unknown").split(":", 1)[0]
        source_detail += f" · last error: run {last_failed.id} {cause}"
    breaker = status.get("breaker") or {"state": "closed"}
    checks.insert(0, {"name": "sources", "ok": sources_ok and breaker.get("state") != "open",
                      "detail": f"{source_detail} · portal breaker {breaker.get('state')}"})
    rows = session.execute(
        select(FindingRow.check, FindingRow.severity, func.count())
        .where(FindingRow.practice == settings.practice, FindingRow.state != S.RESOLVED)
        .group_by(FindingRow.check, FindingRow.severity)).all()
    by_check: dict[str, Counter[str]] = {}
    for check, severity, n in rows:
        by_check.setdefault(check, Counter())[severity] += int(n)
    n = func.count().label("n")
    families = session.execute(
        select(FindingRow.patient_id, n)
        .where(FindingRow.practice == settings.practice, FindingRow.patient_id.is_not(None),
               FindingRow.state.not_in([S.RESOLVED, S.SILENCED]))
        .group_by(FindingRow.patient_id).order_by(n.desc(), FindingRow.patient_id)
        .limit(FAMILIES_SHOWN)).all()
    return {
        "families": [(pid, int(count)) for pid, count in families],
        "checks": checks,
        "status": status,
        "paused": status.get("paused") or {"paused": False},
        "by_check": sorted(by_check.items()),
        "batches": staged_batches(session, settings.practice),
        "runs": status.get("runs", []),
    }


# -- findings ------------------------------------------------------------------------------


@dataclass
class Filters:
    check: str = ""
    severity: str = ""
    state: str = "unresolved"
    age: str = ""
    before: int | None = None  # keyset cursor: rows with a smaller id

    @classmethod
    def parse(cls, q: Any) -> Filters:
        def pick(name: str, allowed: Any, default: str = "") -> str:
            value = q.get(name) or default
            return value if value in allowed else default

        before = q.get("before") or ""
        return cls(check=pick("check", CHECK_IDS), severity=pick("severity", SEVERITIES),
                   state=pick("state", STATES, "unresolved"), age=pick("age", AGES),
                   before=int(before) if before.isdigit() else None)

    def query(self, **change: Any) -> str:
        from urllib.parse import urlencode

        values = {"check": self.check, "severity": self.severity, "state": self.state,
                  "age": self.age, "before": self.before}
        values.update(change)
        return urlencode({k: v for k, v in values.items() if v not in (None, "")})


def findings_page(settings: Settings, session: Session, f: Filters, now: datetime
                  ) -> dict[str, Any]:
    """One page, newest first, keyset-paged on the row id (an index scan at any depth)."""
    where = [FindingRow.practice == settings.practice]
    if f.check:
        where.append(FindingRow.check == f.check)
    if f.severity:
        where.append(FindingRow.severity == f.severity)
    if f.state == "unresolved":
        where.append(FindingRow.state != S.RESOLVED)
    elif f.state != "all":
        where.append(FindingRow.state == f.state)
    min_age = AGES.get(f.age)
    if min_age is not None:
        where.append(FindingRow.first_seen_at <= now - min_age)
    total = session.scalar(select(func.count()).select_from(FindingRow).where(*where)) or 0
    page_where = [*where, FindingRow.id < f.before] if f.before else where
    rows = list(session.scalars(select(FindingRow).where(*page_where)
                                .order_by(FindingRow.id.desc()).limit(PAGE_SIZE + 1)))
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    waits = Waits.read(session, settings)
    return {
        "total": total,
        "rows": [finding_view(r, settings, now, waits) for r in rows],
        "next": f.query(before=rows[-1].id) if more and rows else None,
        "first": f.query(before=None) if f.before else None,
    }


def finding_view(row: FindingRow, settings: Settings, now: datetime,
                 waits: Waits | None = None) -> dict[str, Any]:
    tz = ZoneInfo(settings.digest_timezone)
    check = BY_ID.get(row.check)
    return {
        "row": row, "fingerprint": row.fingerprint, "check": row.check,
        "title": getattr(check, "title", "") if check else "",
        "severity": row.severity, "state": effective_state(row, now),
        "silenceable": row.state not in (S.RESOLVED, S.FIX_QUEUED, S.HELD, S.VERIFYING),
        "silenced": row.state == S.SILENCED,
        "patient_id": row.patient_id, "contact_id": row.contact_id,
        "portal_user_id": row.portal_user_id, "contact_ids": row.contact_ids or [],
        "detail": row.detail, "age": age_text(row.first_seen_at, now),
        "first_seen": local(row.first_seen_at, tz),
        "next": next_check(row, now, settings, waits),
        "silenced_until": local(row.silenced_until, tz), "silenced_by": row.silenced_by,
        "silence_reason": row.silence_reason,
        "remedy": REMEDIES.get(row.check, ()),
    }


# -- one family ----------------------------------------------------------------------------


def read_facts(settings: Settings, patient_id: str) -> tuple[dict[str, Any] | None, str | None]:
    """The checklist from a fresh read of this family in both systems (a targeted read,
    not the practice); (None, why) when it cannot be read.
    Only ids and flags leave this function unless `web_show_names` is on."""
    from worker.scan.engine import utcnow
    from worker.scan.explain import family_facts
    from worker.scan.incremental import Reads, family_view
    from worker.scan.wiring import op_reader, portal_adapter
    from worker.sources.base import SourceError

    try:
        op = op_reader(settings)
        portal = portal_adapter(settings)
        try:
            snap = family_view(Reads(op, portal), patient_id, utcnow(),
                               settings.welcome_window)
        finally:
            close = getattr(portal, "close", None)
            if callable(close):
                close()
    except SettingsError as err:
        return None, f"sources are not configured here ({err})"
    except (SourceError, OSError) as err:
        return None, f"could not read the sources: {type(err).__name__}"
    facts = family_facts(snap, patient_id, names=settings.web_show_names)
    if facts is None:
        return None, f"patient {patient_id} is not in OP's current export"
    return facts, None


def read_contact_charts(settings: Settings, contact_id: str
                        ) -> tuple[list[str] | None, str | None]:
    """The charts a contact is on, read from OP now; (None, why) when it cannot be read."""
    from worker.scan.incremental import Reads, contact_charts
    from worker.scan.wiring import op_reader
    from worker.sources.base import SourceError

    try:
        return contact_charts(Reads(op_reader(settings), None), contact_id), None
    except SettingsError as err:
        return None, f"sources are not configured here ({err})"
    except (SourceError, OSError) as err:
        return None, f"could not read the sources: {type(err).__name__}"


def contact_findings(settings: Settings, session: Session, contact_id: str, now: datetime
                     ) -> list[dict[str, Any]]:
    """Findings naming this contact, alone or in a group (a duplicate)."""
    pattern = '%"' + contact_id.replace("\\", "\\\\").replace("%", "\\%").replace(
        "_", "\\_") + '"%'
    rows = session.scalars(
        select(FindingRow).where(
            FindingRow.practice == settings.practice,
            or_(FindingRow.contact_id == contact_id,
                cast(FindingRow.contact_ids, String).like(pattern, escape="\\")))
        .order_by(FindingRow.state == S.RESOLVED, FindingRow.id).limit(PAGE_SIZE))
    waits = Waits.read(session, settings)
    return [finding_view(r, settings, now, waits) for r in rows]


def family(settings: Settings, session: Session, patient_id: str, now: datetime,
           contact_ids: list[str]) -> dict[str, Any]:
    tz = ZoneInfo(settings.digest_timezone)
    cond = [FindingRow.patient_id == patient_id]
    if contact_ids:
        cond.append(FindingRow.contact_id.in_(contact_ids))
    rows = list(session.scalars(
        select(FindingRow).where(FindingRow.practice == settings.practice, or_(*cond))
        .order_by(FindingRow.state == S.RESOLVED, FindingRow.id)))
    ids = [r.id for r in rows]
    by_id = {r.id: r for r in rows}
    events = list(session.scalars(
        select(FindingEvent).where(FindingEvent.finding_id.in_(ids))
        .order_by(FindingEvent.at.desc(), FindingEvent.id.desc()).limit(500))) if ids else []
    audit = list(session.scalars(
        select(AuditEntry).where(AuditEntry.practice == settings.practice,
                                 AuditEntry.patient_id == patient_id)
        .order_by(AuditEntry.at.desc(), AuditEntry.id.desc()).limit(200)))
    waits = Waits.read(session, settings)
    return {
        "findings": [finding_view(r, settings, now, waits) for r in rows],
        "timeline": [{"at": local(e.at, tz), "check": by_id[e.finding_id].check,
                      "fingerprint": by_id[e.finding_id].fingerprint,
                      "from": e.from_state or "", "to": e.to_state, "cause": e.cause,
                      "run_id": e.run_id} for e in events],
        "audit": [{"at": local(a.at, tz), "user": a.username, "action": a.action,
                   "target": a.target or "", "reason": a.reason or "",
                   "outcome": a.outcome or ""} for a in audit],
        "tz": settings.digest_timezone,
    }
