"""What a digest holds: routing, windows, and the content of one (recipient, window).

Everything here is a function of the state database, the settings and an injected
`now`, so every time rule (window close, DST, repeats) is testable at its boundary.
Nothing here sends, commits or logs PHI.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from config.settings import Policy, Settings
from worker.checks.catalog import BY_ID, CHECK_IDS
from worker.checks.remedies import ESCALATION, REMEDIES
from worker.checks.rootcause import BLOCKERS, WAITS, RootCauses, wait_steps, where
from worker.model.text import scrub_text
from worker.scan.planner import default_policy
from worker.state.db import kv_get, kv_set
from worker.state.models import ActionRow, ActionStatus, DigestSent, FindingRow
from worker.state.models import FindingState as S

log = structlog.get_logger(__name__)

# -- routing ---------------------------------------------------------------------------

FRONT_DESK = "front_desk"
PRACTICE_MANAGER = "practice_manager"
DEFAULT = "default"
CATEGORIES = (FRONT_DESK, PRACTICE_MANAGER)

# Front desk fixes charts, contacts and Welcome emails; the practice manager owns
# privacy, problems only OP support can fix, data-feed errors and everything escalated.
ROUTES: dict[str, str] = {
    "authority_invalid": FRONT_DESK,
    "self_role": FRONT_DESK,
    "self_dependent_missing": FRONT_DESK,
    "contact_email_invalid": FRONT_DESK,
    "contact_inactive": FRONT_DESK,
    "contact_duplicate": FRONT_DESK,
    "patient_inactive": FRONT_DESK,
    "patient_email_present": FRONT_DESK,
    "welcome_not_sent": FRONT_DESK,
    "caregiver_link_missing": FRONT_DESK,
    "portal_patient_email_not_dummy": FRONT_DESK,
    "caregiver_link_stale": PRACTICE_MANAGER,
    "portal_patient_role_invalid": PRACTICE_MANAGER,
    "portal_orphan_user": PRACTICE_MANAGER,
    "invalid_record": PRACTICE_MANAGER,
}
ESCALATED_CATEGORY = PRACTICE_MANAGER
SYSTEM_CATEGORY = PRACTICE_MANAGER

# -- time rules ------------------------------------------------------------------------

DAY = timedelta(days=1)
DAILY_REPEAT_DAYS = 7  # an open item is repeated daily this long, then weekly
IMMEDIATE_LOOKBACK = timedelta(hours=24)  # older events are left to the daily digest
MAX_ITEMS_PER_CHECK = 50  # beyond this a group says "and N more" (oprecon findings)
BACKLOG_EXAMPLES = 5

LISTABLE = (S.OPEN, S.ESCALATED)
WAITING = (S.PENDING, S.HELD, S.FIX_QUEUED, S.VERIFYING)
HIGH_ACTIVE = (S.OPEN, S.FIX_QUEUED, S.HELD, S.VERIFYING)
SENT_STATUSES = ("sent",)
BASELINE_STATUSES = ("sent", "empty")
TROUBLE_STATUSES = ("failed", "unknown")


def route(check: str, state: str) -> str:
    """The staff category for a finding; unknown (future) checks go to the manager."""
    if state == S.ESCALATED:
        return ESCALATED_CATEGORY
    return ROUTES.get(check, PRACTICE_MANAGER)


def policy_off(settings: Settings, check: str) -> bool:
    """Checks turned off by policy are neither listed nor counted."""
    if check not in BY_ID:
        return False
    return settings.policy_for(check, default_policy(check)) is Policy.OFF


# -- recipients ------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipient:
    """One destination. `key` is what tasks and `digests_sent` carry: never the address."""

    key: str
    channel: str  # email | webhook
    address: str = field(repr=False)
    categories: frozenset[str]
    label: str  # for people and logs: "front_desk #1", "webhook"


_warned: set[str] = set()


def _warn_once(event: str, **kw: object) -> None:
    token = f"{event}:{sorted(kw.items())}"
    if token not in _warned:
        _warned.add(token)
        log.warning(event, **kw)


def recipient_key(address: str) -> str:
    """A stable, non-reversible key for an address: config order may change, this won't."""
    digest = hashlib.sha256(address.strip().lower().encode("utf-8")).hexdigest()[:16]
    return f"email:{digest}"


def resolve_recipients(settings: Settings) -> list[Recipient]:
    """Every configured destination with the categories it receives (fallback applied)."""
    configured = {
        cat: [a.strip() for a in addrs if a and a.strip()]
        for cat, addrs in settings.digest_recipients.items()
    }
    for cat in sorted(configured):
        if cat not in CATEGORIES and cat != DEFAULT:
            _warn_once("digest_unknown_category", category=cat, known=list(CATEGORIES))
    cats_by_addr: dict[str, set[str]] = defaultdict(set)
    label_by_addr: dict[str, str] = {}
    order: list[str] = []
    for cat in CATEGORIES:
        addrs = configured.get(cat) or []
        source = cat
        if not addrs:
            addrs = configured.get(DEFAULT) or []
            source = DEFAULT
            if not addrs:
                _warn_once("digest_category_without_recipients", category=cat)
                continue
        for i, addr in enumerate(addrs, start=1):
            norm = addr.lower()
            if norm not in label_by_addr:
                label_by_addr[norm] = f"{source} #{i}"
                order.append(addr)
            cats_by_addr[norm].add(cat)
    out = [
        Recipient(
            key=recipient_key(addr), channel="email", address=addr,
            categories=frozenset(cats_by_addr[addr.lower()]), label=label_by_addr[addr.lower()],
        )
        for addr in order
    ]
    if settings.webhook_url:
        out.append(Recipient("webhook", "webhook", settings.webhook_url,
                             frozenset(CATEGORIES), "webhook"))
    if not out:
        _warn_once("digest_no_recipients")
    return out


def find_recipient(settings: Settings, key: str) -> Recipient | None:
    return next((r for r in resolve_recipients(settings) if r.key == key), None)


# -- windows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A daily window ends at `end`; an immediate one is an event at `end` about `ref`."""

    key: str
    kind: str  # daily | immediate
    end: datetime
    day: date | None = None
    ref: str = ""  # immediate: a fingerprint, "breaker", "guard", "deadman", "fullscan"
    detail: str = ""  # immediate: the part after the last colon (a stamp or run id)


def zone(settings: Settings) -> ZoneInfo:
    try:
        return ZoneInfo(settings.digest_timezone)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise ValueError(
            f"invalid setting OPRECON_DIGEST_TIMEZONE: unknown zone {settings.digest_timezone}"
        ) from err


def _digest_time(settings: Settings) -> time:
    hh, mm = settings.digest_time.split(":")
    return time(int(hh), int(mm))


def daily_close(day: date, settings: Settings) -> datetime:
    """When the window of local date `day` closes, in UTC.

    A wall time skipped by a DST jump (02:30 on spring-forward day) resolves with the
    offset before the jump, i.e. one hour later in new local time; a repeated wall time
    (fall-back day) means its first occurrence. Either way each day closes exactly once.
    """
    local = datetime.combine(day, _digest_time(settings), tzinfo=zone(settings))
    return local.astimezone(UTC)


def daily_window(day: date, settings: Settings) -> Window:
    return Window(f"daily:{day.isoformat()}", "daily", daily_close(day, settings), day)


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def latest_closed_daily(settings: Settings, now: datetime | None = None) -> Window:
    """The most recent daily window whose close is at or before `now`: the one due."""
    now = _now(now)
    today = now.astimezone(zone(settings)).date()
    for day in (today + DAY, today, today - DAY, today - 2 * DAY):
        if daily_close(day, settings) <= now:
            return daily_window(day, settings)
    raise AssertionError("unreachable: a day closes at least every 25 hours")


def next_daily(settings: Settings, now: datetime | None = None) -> Window:
    """The first daily window that closes after `now` (what a preview shows)."""
    latest = latest_closed_daily(settings, now)
    assert latest.day is not None
    return daily_window(latest.day + DAY, settings)


def stamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def parse_stamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def parse_window(key: str, settings: Settings) -> Window:
    """Rebuild a window from its key (what the deliver task receives). ValueError if bad."""
    kind, _, rest = key.partition(":")
    if kind == "daily":
        return daily_window(date.fromisoformat(rest), settings)
    if kind == "immediate" and ":" in rest:
        ref, _, detail = rest.rpartition(":")
        try:
            end = parse_stamp(detail)
        except ValueError:
            end = datetime.min.replace(tzinfo=UTC)  # e.g. "guard:run42": not a time
        return Window(key, "immediate", end, None, ref, detail)
    raise ValueError(f"not a digest window key: {key!r}")


def repeat_due(first: datetime, start: datetime, end: datetime) -> bool:
    """True when a reminder for an item open since `first` falls in (start, end].

    Reminders fall 1..6 days after `first`, then every 7 days. Points, not ages, so a
    missed digest does not skip a weekly reminder: it lands in the next one.
    """
    if end <= first or end <= start:
        return False
    n_lo = max(1, int((start - first) / DAY))
    n_hi = int((end - first) / DAY)
    for n in range(n_lo, n_hi + 1):
        point = first + n * DAY
        if start < point <= end and (n < DAILY_REPEAT_DAYS or n % DAILY_REPEAT_DAYS == 0):
            return True
    return False


# -- immediate notices -----------------------------------------------------------------


@dataclass(frozen=True)
class Notice:
    window_key: str
    kind: str  # finding | escalation | breaker | guard | deadman
    category: str
    at: datetime


def _kv_time(value: dict[str, object], *names: str) -> datetime | None:
    for name in names:
        raw = value.get(name)
        if isinstance(raw, str):
            try:
                parsed = datetime.fromisoformat(raw)
            except ValueError:
                continue
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def breaker_state(session: Session, practice: str) -> dict[str, object] | None:
    """The breaker's kv value when it is open, else None."""
    value = kv_get(session, practice, "breaker") or {}
    return value if value.get("state") == "open" else None


def deadman_state(session: Session, practice: str) -> dict[str, object] | None:
    """kv "deadman" (worker.runtime.health) while scans are overdue, else None."""
    value = kv_get(session, practice, "deadman") or {}
    return value if value.get("overdue") else None


def deadman_episode(value: Mapping[str, object]) -> str:
    """The outage's key: when it started (`at`), so one outage is one notice."""
    at = _kv_time(dict(value), "at", "last_success_at", "armed_at")
    return stamp(at) if at else "unknown"


def deadman_recovery(
    session: Session, practice: str, since: datetime
) -> dict[str, object] | None:
    """kv "deadman" when scans succeed again after an outage staff were told about, and
    the recovery is recent (after `since`): the all-clear is due. Else None."""
    value = kv_get(session, practice, "deadman") or {}
    if value.get("overdue") or not value.get("recovered_alerted"):
        return None
    at = _kv_time(value, "recovered_at")
    return value if at is not None and at >= since else None


def outage_text(start: datetime | None, end: datetime) -> str:
    """How long scans have not succeeded, in words: '47 minutes', '3 hours 5 minutes'."""
    if start is None:
        return "an unknown time"
    minutes = max(0, int((end - start).total_seconds() // 60))
    if minutes < 60:
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    hours, rest = divmod(minutes, 60)
    if hours < 48:
        text = f"{hours} hour{'s' if hours != 1 else ''}"
        return text + (f" {rest} minute{'s' if rest != 1 else ''}" if rest else "")
    days, hours = divmod(hours, 24)
    return f"{days} days" + (f" {hours} hour{'s' if hours != 1 else ''}" if hours else "")


def mark_deadman_alerted(session: Session, practice: str, episode: str, now: datetime) -> None:
    """worker.runtime.health leaves `alerted` false for a new outage; whoever tells staff
    sets it."""
    value = kv_get(session, practice, "deadman") or {}
    if value.get("overdue") and not value.get("alerted") and deadman_episode(value) == episode:
        value["alerted"] = True
        kv_set(session, practice, "deadman", value, now)


def full_scan_missed_state(session: Session, practice: str) -> dict[str, object] | None:
    """kv "full_scan_deferred" (worker.runtime.deferral) once a deferred nightly full scan
    has missed its deadline (`alerted_at` set), until one runs; else None."""
    value = kv_get(session, practice, "full_scan_deferred") or {}
    return value if value.get("alerted_at") else None


def paused_state(session: Session, practice: str) -> dict[str, object] | None:
    value = kv_get(session, practice, "paused") or {}
    return value if value.get("paused") else None


def staged_batches(session: Session, practice: str) -> dict[int, tuple[int, datetime]]:
    """run id → (fixes staged, when) for batches the mass-change guard holds back."""
    rows = session.execute(
        select(ActionRow.run_id, ActionRow.created_at).where(
            ActionRow.practice == practice, ActionRow.status == ActionStatus.STAGED
        )
    )
    out: dict[int, tuple[int, datetime]] = {}
    for run_id, created in rows:
        rid = int(run_id or 0)
        n, at = out.get(rid, (0, created))
        out[rid] = (n + 1, min(at, created))
    return out


def immediate_notices(session: Session, settings: Settings, now: datetime) -> list[Notice]:
    """Every event that warrants telling someone now rather than in the daily digest."""
    practice = settings.practice
    since = now - IMMEDIATE_LOOKBACK
    out: list[Notice] = []
    rows = session.scalars(
        select(FindingRow).where(
            FindingRow.practice == practice,
            FindingRow.state_changed_at >= since,
            FindingRow.state.in_([*HIGH_ACTIVE, S.ESCALATED]),
        )
    )
    for row in rows:
        if policy_off(settings, row.check):
            continue
        if row.state == S.ESCALATED:
            out.append(Notice(f"immediate:{row.fingerprint}:{stamp(row.state_changed_at)}",
                              "escalation", ESCALATED_CATEGORY, row.state_changed_at))
        elif row.severity == "high":
            # One notice per occurrence: first_seen_at resets only when it reopens.
            out.append(Notice(f"immediate:{row.fingerprint}:{stamp(row.first_seen_at)}",
                              "finding", route(row.check, row.state), row.first_seen_at))
    breaker = breaker_state(session, practice)
    if breaker is not None:
        row_at = _kv_time(breaker, "opened_at", "since", "at") or now
        out.append(Notice(f"immediate:breaker:{stamp(row_at)}", "breaker", SYSTEM_CATEGORY,
                          row_at))
    for run_id, (_, at) in sorted(staged_batches(session, practice).items()):
        out.append(Notice(f"immediate:guard:run{run_id}", "guard", SYSTEM_CATEGORY, at))
    deadman = deadman_state(session, practice)
    if deadman is not None:
        out.append(Notice(f"immediate:deadman:{deadman_episode(deadman)}", "deadman",
                          SYSTEM_CATEGORY, _kv_time(deadman, "at") or now))
    recovered = deadman_recovery(session, practice, since)
    if recovered is not None:
        at = _kv_time(recovered, "recovered_at") or now
        out.append(Notice(f"immediate:deadman_clear:{stamp(at)}", "deadman_clear",
                          SYSTEM_CATEGORY, at))
    missed = full_scan_missed_state(session, practice)
    if missed is not None:
        # One notice per deferral: keyed by when the full scan was first skipped.
        first_skip = _kv_time(missed, "since") or now
        out.append(Notice(f"immediate:fullscan:{stamp(first_skip)}", "fullscan", SYSTEM_CATEGORY,
                          _kv_time(missed, "alerted_at") or now))
    return sorted(out, key=lambda n: n.at)


# -- digest content --------------------------------------------------------------------


@dataclass
class Item:
    fingerprint: str
    check: str
    severity: str
    who: list[str]
    what: str
    steps: tuple[str, ...]
    next_check: str
    since: datetime
    age_days: int
    new: bool = False
    repeat: bool = False
    escalated: bool = False
    link: str | None = None  # the console's family page (web_base_url set)
    ids: tuple[str, ...] = ()  # the raw ids the item names (for `StepSet.what`)

    @property
    def tag(self) -> str:
        return "ESCALATED" if self.escalated else "NEW" if self.new else "REMINDER"


@dataclass
class StepSet:
    """Items of one check that share their steps: a bundle says the steps once, then
    lists who they are for, one line each (a 35-item bundle is a few KB, not 90).

    `what`, `next_check` and `tag` are said once for the set when every item says the
    same (the detail up to the item's own ids); otherwise each line carries its own."""

    steps: tuple[str, ...]
    items: list[Item] = field(default_factory=list)
    what: str = ""
    next_check: str = ""
    tag: str = ""


@dataclass
class Group:
    check: str
    title: str
    severity: str
    items: list[Item] = field(default_factory=list)
    hidden: int = 0  # listed-worthy items beyond MAX_ITEMS_PER_CHECK
    # Steps shown for the hidden ones when none of the group is listed (a capped bundle).
    steps: tuple[str, ...] = ()
    # A bundle's group of several items: listed by shared steps instead of one by one.
    sets: list[StepSet] = field(default_factory=list)


@dataclass
class BacklogRow:
    check: str
    title: str
    severity: str
    count: int
    escalated: int
    examples: list[str]
    steps: tuple[str, ...]


@dataclass
class Counts:
    new: int = 0
    still_open: int = 0
    oldest_days: int = 0  # of the still-open ones
    resolved: int = 0
    escalated: int = 0
    waiting: int = 0
    silenced: int = 0

    @property
    def open_total(self) -> int:
        return self.new + self.still_open


@dataclass
class SummaryRow:
    """One line of a bundle's counts: a check, or a kind of system notice."""

    ref: str
    title: str
    count: int
    escalated: int = 0


@dataclass
class SystemNote:
    kind: str
    title: str
    text: str
    steps: tuple[str, ...]


@dataclass
class Digest:
    practice: str
    kind: str  # daily | immediate
    window: Window
    start: datetime | None
    generated_at: datetime
    categories: frozenset[str]
    tz: str
    next_scan: str
    backlog: bool = False
    counts: Counts = field(default_factory=Counts)
    groups: list[Group] = field(default_factory=list)
    backlog_rows: list[BacklogRow] = field(default_factory=list)
    notes: list[SystemNote] = field(default_factory=list)
    previous_issue: str | None = None
    # Immediate only: the notice windows this message answers (more than one: a bundle).
    notice_keys: list[str] = field(default_factory=list)
    summary: list[SummaryRow] = field(default_factory=list)  # a bundle's counts
    console_url: str | None = None  # web_base_url: where the console lists the rest

    def findings_link(self, check: str) -> str | None:
        """The console's findings page filtered to one check (ids only in the URL)."""
        if not self.console_url:
            return None
        from urllib.parse import urlencode

        return f"{self.console_url.rstrip('/')}/findings?{urlencode({'check': check})}"

    @property
    def bundled(self) -> bool:
        return len(self.notice_keys) > 1

    @property
    def hidden(self) -> int:
        return sum(g.hidden for g in self.groups)

    @property
    def items(self) -> int:
        """How many problems this digest reports (what `digests_sent.items` records)."""
        if self.backlog:
            return sum(r.count for r in self.backlog_rows) + len(self.notes)
        return sum(len(g.items) + g.hidden for g in self.groups) + len(self.notes)

    @property
    def is_empty(self) -> bool:
        c = self.counts
        return self.items == 0 and c.new == 0 and c.resolved == 0 and c.escalated == 0

    def local(self, at: datetime | None) -> str:
        if at is None:
            return ""
        return at.astimezone(ZoneInfo(self.tz)).strftime("%a %d %b %Y %H:%M %Z")


Names = Mapping[str, str]  # "patient:P1" / "contact:C1" → display name


def who_of(row: FindingRow, names: Names | None) -> list[str]:
    def label(kind: str, ident: str, text: str) -> str:
        name = names.get(f"{kind}:{ident}") if names else None
        return f"{text} ({name})" if name else text

    out: list[str] = []
    if row.patient_id:
        out.append(label("patient", row.patient_id, f"chart {row.patient_id}"))
    contact_ids = list(row.contact_ids or [])
    if len(contact_ids) > 1:
        out.append("contacts " + ", ".join(label("contact", c, c) for c in contact_ids))
    elif row.contact_id:
        out.append(label("contact", row.contact_id, f"contact {row.contact_id}"))
    if row.portal_user_id:
        out.append(f"portal user {row.portal_user_id}")
    return out


def _clock(at: datetime, now: datetime, tz: ZoneInfo) -> str:
    """'14:35 EST' today (local), 'Tue 24 Nov 14:35 EST' on another day."""
    local = at.astimezone(tz)
    if local.date() == now.astimezone(tz).date():
        return local.strftime("%H:%M %Z")
    return local.strftime("%a %d %b %H:%M %Z")


def _next_check(row: FindingRow, settings: Settings, now: datetime, tz: ZoneInfo,
                blocker: Any = None, staged_run: int | None = None) -> str:
    """What happens next to this item, in the words of what oprecon will actually do:
    a fix held by the mass-change guard waits for staff, a portal fix waits for its
    OP-side root cause, a fix on hold is confirmed once the portal has caught up."""
    every = f"every {settings.incremental_scan_minutes:g} minutes"
    if row.state == S.ESCALATED:
        return (f"on every scan ({every}); oprecon makes no more fix attempts, and the item "
                "clears itself once the records are right")
    if staged_run is not None:
        return (f"waiting for staff approval: oprecon fixes approve {staged_run} (look first "
                f"with oprecon fixes show {staged_run}); the mass-change guard holds this fix "
                "until then")
    if blocker is not None:
        return (f"waits until {blocker.check} on this family ({where(blocker)}) is fixed in "
                f"OP; then oprecon {WAITS.get(row.check, 'fixes this')} by itself")
    if row.state in (S.HELD, S.VERIFYING):
        if row.next_check_at is not None and row.next_check_at > now:
            return (f"confirms after {_clock(row.next_check_at, now, tz)}, once the portal has "
                    "had time to show the fix")
        return "confirms at the next verification (every minute): the fix's hold is over"
    if row.state == S.FIX_QUEUED:
        return ("a fix is on its way to the portal; oprecon confirms it once the portal has "
                "had time to show it")
    if row.state == S.PENDING:
        confirm = row.first_seen_at + settings.propagation_delay
        if confirm > now:
            return (f"confirms after {_clock(confirm, now, tz)}, once the portal has had time "
                    "to show the last change")
    if row.next_check_at is not None and row.next_check_at > now:
        return (f"after {_clock(row.next_check_at, now, tz)}, when the portal has had time to "
                "show the last change")
    return f"on the next scan ({every}); the item clears itself once the records are right"


def staged_fixes(session: Session, practice: str) -> dict[int, int]:
    """Finding id → the run whose batch the mass-change guard holds its fix in."""
    rows = session.execute(select(ActionRow.finding_id, ActionRow.run_id).where(
        ActionRow.practice == practice, ActionRow.status == ActionStatus.STAGED))
    return {int(fid): int(run or 0) for fid, run in rows}


def root_causes(session: Session, settings: Settings) -> RootCauses:
    """Open OP-side blockers (worker.checks.rootcause), as the planner counts them:
    neither resolved nor silenced, and their check not turned off."""
    checks = [c for c in BLOCKERS if not policy_off(settings, c)]
    return RootCauses(session.scalars(select(FindingRow).where(
        FindingRow.practice == settings.practice,
        FindingRow.check.in_(checks),
        FindingRow.state.not_in([S.RESOLVED, S.SILENCED]),
    )))


# The guide's steps find records by name; a digest that hides names (the default) gives
# ids instead, so the step must point at the id it shows.
_BY_NAME = (
    ("search by last name, then by email address", "search by the contact id shown above"),
    ("search by the last name", "search by the contact ids shown above"),
    ("find the contact by last name", "find the contact by the id shown above"),
    ("search by last name", "search by the contact id shown above"),
    ("search last name+first name", "search by the portal user id shown above"),
)


def steps_for_ids(steps: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    out = []
    for step in steps:
        for by_name, by_id in _BY_NAME:
            step = step.replace(by_name, by_id)
        out.append(step)
    return tuple(out)


def _item(row: FindingRow, settings: Settings, now: datetime, tz: ZoneInfo,
          names: Names | None, since: datetime, causes: RootCauses | None = None,
          staged: Mapping[int, int] | None = None) -> Item:
    escalated = row.state == S.ESCALATED
    steps = ESCALATION if escalated else REMEDIES.get(row.check, ())
    blocker = causes.blocker_of(row) if causes else None
    if blocker is not None:
        # Root cause first: the step to take is the OP-side blocker's, not OP support.
        steps = wait_steps(row, blocker)
    detail = row.detail if settings.digest_show_names and names else scrub_text(row.detail)
    if not (settings.digest_show_names and names):
        steps = steps_for_ids(steps)
    return Item(
        fingerprint=row.fingerprint, check=row.check, severity=row.severity,
        who=who_of(row, names), what=detail, steps=tuple(steps),
        next_check=_next_check(row, settings, now, tz, blocker,
                               (staged or {}).get(row.id) if not escalated else None),
        since=since, age_days=max(0, (now - row.first_seen_at).days), escalated=escalated,
        link=family_link(settings, row.patient_id,
                         row.contact_id or next(iter(row.contact_ids or ()), None)),
        ids=tuple(i for i in (row.patient_id, row.contact_id, row.portal_user_id,
                              *(row.contact_ids or ())) if i),
    )


def family_link(settings: Settings, patient_id: str | None,
                contact_id: str | None = None) -> str | None:
    """The console's family page for an item (or, for an item naming only a contact, the
    contact's page, which leads to their family): ids only, never a name or an address."""
    if not settings.web_base_url or not (patient_id or contact_id):
        return None
    from urllib.parse import quote

    base = settings.web_base_url.rstrip("/")
    if patient_id:
        return f"{base}/families/{quote(patient_id, safe='')}"
    return f"{base}/contacts/{quote(contact_id or '', safe='')}"


def _check_order(check: str) -> tuple[int, int, str]:
    sev = {"high": 0, "warning": 1, "info": 2}.get(BY_ID[check].severity if check in BY_ID
                                                   else "warning", 1)
    idx = CHECK_IDS.index(check) if check in CHECK_IDS else len(CHECK_IDS)
    return (sev, idx, check)


def _title(check: str) -> str:
    return BY_ID[check].title if check in BY_ID else check


def _severity(check: str) -> str:
    return str(BY_ID[check].severity) if check in BY_ID else "warning"


def _routed_rows(
    session: Session, settings: Settings, categories: frozenset[str], resolved_since: datetime
) -> list[FindingRow]:
    rows = session.scalars(
        select(FindingRow).where(
            FindingRow.practice == settings.practice,
            (FindingRow.state != S.RESOLVED) | (FindingRow.resolved_at > resolved_since),
        ).order_by(FindingRow.first_seen_at, FindingRow.id)
    )
    return [
        r for r in rows
        if route(r.check, r.state) in categories and not policy_off(settings, r.check)
    ]


def _history(session: Session, practice: str, key: str, before: str) -> list[DigestSent]:
    """This recipient's earlier daily rows, newest first (keys sort as dates do)."""
    return list(
        session.scalars(
            select(DigestSent).where(
                DigestSent.practice == practice,
                DigestSent.recipient == key,
                DigestSent.window_key.like("daily:%"),
                DigestSent.window_key < before,
            ).order_by(DigestSent.window_key.desc())
        )
    )


def _system_notes(session: Session, settings: Settings, now: datetime) -> list[SystemNote]:
    practice = settings.practice
    notes: list[SystemNote] = []
    if breaker_state(session, practice) is not None:
        notes.append(breaker_note())
    guard = kv_get(session, practice, "guard")
    for run_id, (n, _) in sorted(staged_batches(session, practice).items()):
        notes.append(guard_note(run_id, n, guard))
    deadman = deadman_state(session, practice)
    if deadman is not None:
        notes.append(deadman_note(deadman, now))
    missed = full_scan_missed_state(session, practice)
    if missed is not None:
        notes.append(full_scan_note(missed))
    paused = paused_state(session, practice)
    if paused is not None:
        notes.append(paused_note(paused))
    return notes


def paused_note(value: Mapping[str, object]) -> SystemNote:
    reason = scrub_text(str(value.get("reason") or "no reason given"))
    return SystemNote(
        "paused", "Automatic fixes are paused",
        f"On-call paused oprecon's automatic portal fixes ({reason}). Problems are still "
        "found and reported here, but nothing is fixed for you until fixes resume.",
        (
            "Handle the items below by hand with their steps, including the ones oprecon "
            "would normally fix itself.",
            "Ask on-call when fixes will resume (`oprecon resume`).",
        ),
    )


def breaker_note() -> SystemNote:
    return SystemNote(
        "breaker", "oprecon stopped changing the portal",
        "Too many recent portal requests failed, so oprecon paused its automatic portal "
        "fixes to avoid doing harm. Checks and digests go on as usual.",
        (
            "Log in to the OP Portal admin site and see whether it works for you.",
            "If the portal is down, nothing else is needed: oprecon tries again by itself "
            "after a cool-down and then finishes the waiting fixes.",
            "If this notice is still here tomorrow, ask whoever runs oprecon to look at "
            "`oprecon status`.",
        ),
    )


def guard_note(run_id: int, n: int, guard: Mapping[str, object] | None = None) -> SystemNote:
    why = ""
    if guard and guard.get("run_id") == run_id and guard.get("reason"):
        why = f" The guard's reason: {guard['reason']}."
    return SystemNote(
        "guard", "A large batch of fixes is waiting for approval",
        f"Scan run {run_id} wanted to change {n} portal record(s) at once, more than the "
        f"mass-change guard allows. Nothing in that batch has been changed.{why}",
        (
            "Think of anything that could explain many changes at once (a bulk import, a "
            "merge of many contacts, a new export job).",
            f"See each held fix and the record it is for with `oprecon fixes show {run_id}`.",
            f"If the changes are expected, have whoever runs oprecon approve them with "
            f"`oprecon fixes approve {run_id}`.",
            f"If not, reject them with `oprecon fixes reject {run_id}` and tell whoever "
            "runs oprecon.",
        ),
    )


def full_scan_note(value: Mapping[str, object]) -> SystemNote:
    return SystemNote(
        "fullscan", "last night's full check did not run",
        "The nightly check of the whole practice could not start (another check was "
        "still running) and is late. oprecon keeps trying every few minutes. Until it "
        "runs, duplicate contacts, deleted records and portal links changed by hand are "
        "not looked at; everything else is checked as usual.",
        (
            "Nothing is needed from the front desk.",
            "Tell whoever runs oprecon: `oprecon status` shows why it could not start and "
            "what held it.",
        ),
    )


def deadman_note(value: Mapping[str, object], now: datetime) -> SystemNote:
    # From the last success (or the arming of the switch) to now, not the age the
    # switch recorded at its last check.
    since = _kv_time(dict(value), "last_success_at", "armed_at")
    return SystemNote(
        "deadman", "oprecon has stopped checking",
        f"No reconciliation has finished for {outage_text(since, now)}. Until it runs "
        "again, new problems are not found and this digest may be incomplete.",
        (
            "Tell whoever runs oprecon at once; `oprecon health` shows which part stopped.",
            "In the meantime, handle portal complaints with the manual troubleshooting "
            "steps.",
        ),
    )


def deadman_clear_note(value: Mapping[str, object]) -> SystemNote:
    # From the last success before the outage to the first one after it.
    start = _kv_time(dict(value), "recovered_from")
    end = _kv_time(dict(value), "last_success_at", "recovered_at")
    lasted = outage_text(start, end) if end is not None else "a while"
    return SystemNote(
        "deadman_clear", "oprecon is checking again",
        f"Reconciliation runs again: the outage we told you about is over (no run finished "
        f"for about {lasted}). Problems that came up meanwhile are being found now.",
        (
            "Nothing to do: the next digest covers what was found during the outage.",
        ),
    )


def _base(settings: Settings, kind: str, window: Window, start: datetime | None,
          now: datetime, categories: frozenset[str]) -> Digest:
    return Digest(
        practice=settings.practice, kind=kind, window=window, start=start, generated_at=now,
        categories=categories, tz=settings.digest_timezone,
        next_scan=f"every {settings.incremental_scan_minutes:g} minutes",
        console_url=settings.web_base_url or None,
    )


def build_daily(
    session: Session,
    settings: Settings,
    recipient: Recipient,
    window: Window,
    now: datetime | None = None,
    names: Names | None = None,
) -> Digest:
    """The daily digest of `window` for `recipient`, as the state database shows it now.

    "Since last digest" means since the close of this recipient's last daily window that
    was certainly delivered (sent, or empty). With none sent yet, the whole backlog is
    summarised by check instead of listed item by item.
    """
    now = _now(now)
    tz = zone(settings)
    end = window.end
    history = _history(session, settings.practice, recipient.key, window.key)
    backlog = not any(h.status in SENT_STATUSES for h in history)
    last_ok = next((h for h in history if h.status in BASELINE_STATUSES), None)
    start = (parse_window(last_ok.window_key, settings).end if last_ok is not None
             else end - DAY)
    digest = _base(settings, "daily", window, start, now, recipient.categories)
    digest.backlog = backlog
    trouble = next((h for h in history if h.status in TROUBLE_STATUSES
                    and (last_ok is None or h.window_key > last_ok.window_key)), None)
    if trouble is not None:
        day = trouble.window_key.removeprefix("daily:")
        digest.previous_issue = (
            f"the digest for {day} may not have reached you (delivery status: "
            f"{trouble.status}); this one covers everything since the last one that did."
            if trouble.status == "unknown" else
            f"the digest for {day} could not be delivered; this one covers everything "
            "since the last one that was."
        )
    if SYSTEM_CATEGORY in recipient.categories:
        digest.notes = _system_notes(session, settings, now)

    counts = digest.counts
    causes = root_causes(session, settings)
    staged = staged_fixes(session, settings.practice)
    listed: dict[str, Group] = {}
    backlog_rows: dict[str, BacklogRow] = {}
    for row in _routed_rows(session, settings, recipient.categories, start):
        if row.state == S.RESOLVED:
            if row.resolved_at is not None and start < row.resolved_at <= end:
                counts.resolved += 1
            continue
        if row.state == S.SILENCED:
            counts.silenced += 1
            continue
        if row.state in WAITING:
            counts.waiting += 1
            continue
        if row.state not in LISTABLE:
            continue
        escalated = row.state == S.ESCALATED
        ref = row.state_changed_at if escalated else row.first_seen_at
        if row.first_seen_at > end:
            continue  # appeared after the window closed: the next digest reports it
        new = start < ref <= end
        counts.new += new
        counts.still_open += not new
        counts.escalated += escalated
        if not new:
            counts.oldest_days = max(counts.oldest_days, (now - row.first_seen_at).days)
        if backlog:
            b = backlog_rows.setdefault(row.check, BacklogRow(
                row.check, _title(row.check), _severity(row.check), 0, 0, [],
                tuple(REMEDIES.get(row.check, ())) if settings.digest_show_names and names
                else steps_for_ids(REMEDIES.get(row.check, ()))))
            b.count += 1
            b.escalated += escalated
            if len(b.examples) < BACKLOG_EXAMPLES:
                b.examples.append("; ".join(who_of(row, names)) or row.fingerprint)
            continue
        repeat = not new and repeat_due(ref, start, end)
        if not (new or repeat):
            continue
        group = listed.setdefault(row.check, Group(row.check, _title(row.check),
                                                   _severity(row.check)))
        if len(group.items) >= MAX_ITEMS_PER_CHECK:
            group.hidden += 1
            continue
        item = _item(row, settings, now, tz, names, ref, causes, staged)
        item.new, item.repeat = new, repeat
        group.items.append(item)
    for group in listed.values():
        group.items.sort(key=lambda i: (not i.escalated, not i.new, i.since))
        if len(group.items) > 1:  # forty new items of one check: the steps once, not forty times
            group.sets = step_sets(group.items)
    digest.groups = [listed[c] for c in sorted(listed, key=_check_order)]
    digest.backlog_rows = [backlog_rows[c] for c in sorted(backlog_rows, key=_check_order)]
    return digest


def build_immediate(
    session: Session,
    settings: Settings,
    recipient: Recipient,
    window: Window,
    now: datetime | None = None,
    names: Names | None = None,
) -> Digest | None:
    """The notice for one immediate window, or None when its cause has already cleared."""
    now = _now(now)
    practice = settings.practice
    digest = _base(settings, "immediate", window, None, now, recipient.categories)
    digest.notice_keys = [window.key]
    if window.ref == "breaker":
        if breaker_state(session, practice) is None:
            return None
        digest.notes = [breaker_note()]
        return digest
    if window.ref == "guard":
        run_id = int(window.detail.removeprefix("run") or 0)
        batch = staged_batches(session, practice).get(run_id)
        if batch is None:
            return None
        digest.notes = [guard_note(run_id, batch[0], kv_get(session, practice, "guard"))]
        return digest
    if window.ref == "deadman":
        value = deadman_state(session, practice)
        if value is None:
            return None
        digest.notes = [deadman_note(value, now)]
        return digest
    if window.ref == "deadman_clear":
        value = deadman_recovery(session, practice, now - IMMEDIATE_LOOKBACK)
        if value is None:
            return None
        digest.notes = [deadman_clear_note(value)]
        return digest
    if window.ref == "fullscan":
        missed = full_scan_missed_state(session, practice)
        if missed is None:
            return None  # it ran meanwhile
        digest.notes = [full_scan_note(missed)]
        return digest
    row = session.scalar(
        select(FindingRow).where(
            FindingRow.practice == practice, FindingRow.fingerprint == window.ref
        )
    )
    if row is None or row.state in (S.RESOLVED, S.SILENCED, S.PENDING):
        return None
    item = _item(row, settings, now, zone(settings), names, window.end,
                 root_causes(session, settings), staged_fixes(session, practice))
    item.new = True
    digest.groups = [Group(row.check, _title(row.check), row.severity, [item])]
    if row.state == S.ESCALATED:
        digest.counts.escalated = 1
    return digest


def bundle_immediate(parts: list[Digest], max_items: int) -> Digest:
    """Several immediate notices for one recipient as one message.

    A run that finds 40 stale caregiver links must not send 40 emails. Items are merged
    by check (the daily digest's order), system notices stay on top, and the counts go
    in `summary`. Beyond `max_items` listed findings the rest are only counted: every
    check keeps at least one listed item while the cap allows, so each kind of problem
    still shows its steps. A single part is returned as it is: a bundle of one reads
    exactly like the notice it always was.
    """
    if not parts:
        raise ValueError("a bundle needs at least one notice")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    digest = Digest(
        practice=first.practice, kind="immediate", window=first.window, start=None,
        generated_at=first.generated_at, categories=first.categories, tz=first.tz,
        next_scan=first.next_scan, console_url=first.console_url,
    )
    merged: dict[str, Group] = {}
    for part in parts:
        digest.notice_keys.extend(part.notice_keys)
        digest.notes.extend(part.notes)
        digest.counts.escalated += part.counts.escalated
        for group in part.groups:
            into = merged.setdefault(group.check, Group(group.check, group.title,
                                                        _severity(group.check)))
            into.items.extend(group.items)
    groups = [merged[c] for c in sorted(merged, key=_check_order)]
    for group in groups:
        group.items.sort(key=lambda i: (not i.escalated, i.since, i.fingerprint))
    notes_by_kind: dict[str, SummaryRow] = {}
    for note in digest.notes:
        notes_by_kind.setdefault(note.kind, SummaryRow(note.kind, note.title, 0)).count += 1
    digest.summary = [*notes_by_kind.values()] + [
        SummaryRow(g.check, g.title, len(g.items), sum(i.escalated for i in g.items))
        for g in groups
    ]
    _cap_items(groups, max_items)
    for group in groups:
        if len(group.items) > 1:
            group.sets = step_sets(group.items)
    digest.groups = groups
    return digest


def step_sets(items: list[Item]) -> list[StepSet]:
    """Items grouped by their steps, in their order: the steps are said once per set.

    Steps differ within one check when some items are escalated (OP support) or wait for
    a root cause (the blocker's steps); every other item of a check shares the remedy."""
    sets: dict[tuple[str, ...], StepSet] = {}
    for item in items:
        sets.setdefault(item.steps, StepSet(item.steps)).items.append(item)
    for one in sets.values():
        first = one.items[0]
        if len({_shape(i) for i in one.items}) == 1:
            one.what = first.what
        if len({i.next_check for i in one.items}) == 1:
            one.next_check = first.next_check
        if len({i.tag for i in one.items}) == 1:
            one.tag = first.tag
    return list(sets.values())


def _shape(item: Item) -> str:
    """The item's detail with its own ids blanked: two details of one shape say the same
    thing about different records, so a set says it once."""
    text = item.what
    for ident in sorted(item.ids, key=len, reverse=True):
        text = text.replace(ident, "\x00")
    return text


def _cap_items(groups: list[Group], max_items: int) -> None:
    """Keep at most `max_items` listed: one per group first, then in display order."""
    keep = [0] * len(groups)
    budget = max(0, max_items)
    for i, group in enumerate(groups):
        if budget and group.items:
            keep[i], budget = 1, budget - 1
    for i, group in enumerate(groups):
        extra = min(len(group.items) - keep[i], budget)
        keep[i], budget = keep[i] + extra, budget - extra
    for i, group in enumerate(groups):
        group.hidden += len(group.items) - keep[i]
        del group.items[keep[i]:]
        if group.hidden and not group.items:
            group.steps = steps_for_ids(REMEDIES.get(group.check, ()))


def build(
    session: Session,
    settings: Settings,
    recipient: Recipient,
    window: Window,
    now: datetime | None = None,
    names: Names | None = None,
) -> Digest | None:
    if window.kind == "daily":
        return build_daily(session, settings, recipient, window, now, names)
    return build_immediate(session, settings, recipient, window, now, names)


def mentioned_ids(session: Session, practice: str) -> tuple[set[str], set[str]]:
    """Patient and contact ids a digest or notice may list: the only names worth loading.

    That is every listable finding, plus high-severity ones oprecon is still fixing (an
    immediate notice lists those, e.g. a stale caregiver link whose fix is on hold).
    """
    patients: set[str] = set()
    contacts: set[str] = set()
    rows = session.execute(
        select(FindingRow.patient_id, FindingRow.contact_id, FindingRow.contact_ids).where(
            FindingRow.practice == practice,
            FindingRow.state.in_(LISTABLE)
            | (FindingRow.state.in_(HIGH_ACTIVE) & (FindingRow.severity == "high")),
        )
    )
    for patient_id, contact_id, contact_ids in rows:
        if patient_id:
            patients.add(patient_id)
        if contact_id:
            contacts.add(contact_id)
        contacts.update(contact_ids or [])
    return patients, contacts
