"""Turn findings + their state + policy into a plan: what to fix, alert, hold or leave.

The planner decides; it changes nothing. Every item carries the reason for its
decision, which is what `--dry-run` and an ad hoc run print for on-call.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from config.settings import Policy, Settings
from worker.checks.catalog import BY_ID
from worker.checks.rootcause import RootCauses, wait_reason
from worker.model.findings import Action, Finding, FixKind, Severity
from worker.model.text import address_key
from worker.state.models import FindingRow
from worker.state.models import FindingState as S


class Decision(enum.StrEnum):
    FIX = "fix"
    ALERT = "alert"
    STAGED = "staged"  # the mass-change guard held the batch back
    ESCALATED = "escalated"
    WAIT = "wait"  # cross-system mismatch seen once: confirm after the propagation delay
    HOLD = "hold"  # fix applied: the portal is catching up
    QUEUED = "queued"  # a fix is already on its way
    SILENCED = "silenced"
    OFF = "off"

    @property
    def json_action(self) -> str:
        if self is Decision.FIX:
            return "fix"
        if self in (Decision.ALERT, Decision.STAGED, Decision.ESCALATED):
            return "alert"
        return "none"


@dataclass
class PlanItem:
    finding: Finding
    decision: Decision
    reason: str
    state: str
    immediate: bool = False  # tell staff now, not in the next digest
    until: datetime | None = None
    # The open OP-side problem this portal fix waits for (worker.checks.rootcause).
    blocked_by: Any = None

    def to_json(self) -> dict[str, object]:
        return self.finding.to_json(action=self.decision.json_action)


@dataclass
class Plan:
    items: list[PlanItem] = field(default_factory=list)
    guard_tripped: bool = False
    guard_reason: str = ""

    def counts(self) -> Counter[str]:
        return Counter(str(i.decision) for i in self.items)

    def by_check(self) -> Counter[str]:
        return Counter(i.finding.check for i in self.items)

    @property
    def fixes(self) -> list[PlanItem]:
        return [i for i in self.items if i.decision is Decision.FIX]


@dataclass(frozen=True)
class FixGate:
    """Why fixes may not run right now, if any (checked in this order)."""

    portal_writable: bool = True
    paused: bool = False
    breaker_open: bool = False
    # Why the input is too damaged to act on (a file over unreadable_alert_percent).
    unreadable: str | None = None

    def blocked_reason(self, settings: Settings) -> str | None:
        if settings.dry_run:
            return "detect-only: OPRECON_DRY_RUN is set"
        if self.unreadable:
            return self.unreadable
        if self.paused:
            return "fixes are paused (oprecon resume to restart them)"
        if self.breaker_open:
            return "the portal is failing; fixes stopped until it recovers"
        if not self.portal_writable:
            return "the portal source is read-only (exports): apply this fix by hand"
        return None


def default_policy(check: str) -> Policy:
    return Policy.FIX if BY_ID[check].action is Action.FIX else Policy.ALERT


def make_plan(
    findings: list[Finding],
    rows: dict[str, FindingRow],
    settings: Settings,
    now: datetime,
    gate: FixGate,
    population: int,
    welcome_recently_resent: frozenset[tuple[str, str]] = frozenset(),
    *,
    guard: bool = True,
    other_blockers: Iterable[Any] = (),
) -> Plan:
    """`guard=False` leaves the mass-change guard to the caller: a shard of a sharded
    scan plans a part of the run, and the guard must count the whole of it.

    Root cause first: a portal fix waits while an OP-side problem in its family is open
    (worker.checks.rootcause). The blockers are this run's findings that are neither
    silenced nor turned off, plus `other_blockers` (open state rows of checks the run's
    scope leaves out, such as duplicate groups in an incremental scan).
    """
    plan = Plan()
    blocked = gate.blocked_reason(settings)
    causes = RootCauses([
        *(f for f in findings if _blocks(f, rows.get(f.fingerprint), settings)),
        *other_blockers,
    ])
    for f in findings:
        row = rows.get(f.fingerprint)
        state = row.state if row is not None else S.OPEN
        plan.items.append(_decide(f, row, state, settings, now, blocked, welcome_recently_resent,
                                  causes))
    if guard:
        _guard(plan, settings, population)
    return plan


def _blocks(f: Finding, row: FindingRow | None, settings: Settings) -> bool:
    """Whether this finding holds back portal fixes: not when staff silenced it or its
    check is off (they decided to live with it), nor once it is resolved."""
    if settings.policy_for(f.check, default_policy(f.check)) is Policy.OFF:
        return False
    return row is None or row.state not in (S.SILENCED, S.RESOLVED)


def _decide(
    f: Finding,
    row: FindingRow | None,
    state: str,
    settings: Settings,
    now: datetime,
    blocked: str | None,
    resent: frozenset[tuple[str, str]],
    causes: RootCauses | None = None,
) -> PlanItem:
    policy = settings.policy_for(f.check, default_policy(f.check))
    high = f.severity is Severity.HIGH

    def item(decision: Decision, reason: str, until: datetime | None = None) -> PlanItem:
        immediate = high and decision in (Decision.FIX, Decision.ALERT, Decision.STAGED)
        return PlanItem(f, decision, reason, str(state), immediate, until)

    if policy is Policy.OFF:
        return item(Decision.OFF, f"check {f.check} is turned off")
    if state == S.SILENCED and row is not None:
        until = row.silenced_until
        reason = f"silenced by {row.silenced_by}: {row.silence_reason}"
        return item(Decision.SILENCED, reason, until)
    if state == S.PENDING and row is not None:
        until = row.first_seen_at + settings.propagation_delay
        return item(
            Decision.WAIT,
            "cross-system mismatch seen once; acting only if still present after the "
            "propagation delay",
            until,
        )
    if state in (S.HELD, S.VERIFYING) and row is not None:
        return item(Decision.HOLD, "fix applied; the portal is catching up", row.next_check_at)
    if state == S.FIX_QUEUED:
        return item(Decision.QUEUED, "a fix is already queued")
    if state == S.ESCALATED:
        return item(Decision.ESCALATED, "fixes did not resolve it: contact OP support")
    cause = causes.blocker_of(f) if causes else None
    if cause is not None:
        waiting = item(Decision.WAIT, wait_reason(f, cause))
        waiting.blocked_by = cause
        return waiting
    if f.action is not Action.FIX or f.fix is None:
        return item(Decision.ALERT, "needs a person: oprecon never changes this itself")
    if policy is Policy.ALERT:
        return item(Decision.ALERT, f"policy for {f.check} is alert (detect-only)")
    if blocked:
        return item(Decision.ALERT, blocked)
    if f.fix is FixKind.RESEND_WELCOME and (
        f.contact_id or "", address_key(f.contact_id, str(f.data.get("email") or ""))
    ) in resent:
        return item(
            Decision.ALERT,
            "a Welcome email was already resent to this address within the window; not "
            "resending again",
        )
    attempt = (row.fix_attempts if row is not None else 0) + 1
    return item(Decision.FIX, f"{f.fix} (attempt {attempt})")


def guard_verdict(fixes: int, settings: Settings, population: int) -> str | None:
    """Why `fixes` fixes in one run are too many for the mass-change guard, or None."""
    if not fixes:
        return None
    limit_n = settings.mass_change_max_fixes
    limit_pct = settings.mass_change_max_percent
    pct = 100.0 * fixes / max(1, population)
    over_n = limit_n > 0 and fixes > limit_n
    over_pct = limit_pct > 0 and pct > limit_pct and fixes > settings.mass_change_min_fixes
    if not (over_n or over_pct):
        return None
    return (
        f"{fixes} fixes ({pct:.1f}% of {population} patients) exceed the mass-change "
        f"guard ({limit_n} fixes / {limit_pct:g}%): batch staged for approval"
    )


def _guard(plan: Plan, settings: Settings, population: int) -> None:
    """Stage every fix when a run would change an unusual number of records."""
    fixes = plan.fixes
    reason = guard_verdict(len(fixes), settings, population)
    if reason is None:
        return
    plan.guard_tripped = True
    plan.guard_reason = reason
    for i in fixes:
        i.decision = Decision.STAGED
        i.reason = plan.guard_reason
        i.immediate = False
