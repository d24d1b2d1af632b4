"""Text output for people: the plan, like `terraform plan`, and small tables.

Scripts use `--json`; this module is only for terminals, so it may change wording.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from worker.checks.catalog import BY_ID
from worker.checks.remedies import REMEDIES
from worker.checks.rootcause import wait_steps
from worker.scan.engine import RunResult
from worker.scan.planner import Decision

SYMBOL = {
    Decision.FIX: "~",
    Decision.ALERT: "!",
    Decision.ESCALATED: "!!",
    Decision.STAGED: "?",
    Decision.WAIT: ".",
    Decision.HOLD: "=",
    Decision.QUEUED: "~",
    Decision.SILENCED: "-",
    Decision.OFF: "-",
}


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [["" if v is None else str(v) for v in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(v)) for w, v in zip(widths, r, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def summary_line(result: RunResult) -> str:
    c = result.plan.counts()
    verb = "Plan" if result.dry_run else "Run"
    root = sum(1 for i in result.plan.items if i.blocked_by is not None)
    parts = [
        f"{c.get(Decision.FIX, 0)} to fix",
        f"{c.get(Decision.ALERT, 0) + c.get(Decision.ESCALATED, 0)} to alert",
        f"{c.get(Decision.STAGED, 0)} staged",
        f"{c.get(Decision.WAIT, 0) - root} waiting on the portal delay",
        f"{root} waiting for a root cause in OP",
        f"{c.get(Decision.HOLD, 0) + c.get(Decision.QUEUED, 0)} on hold",
        f"{c.get(Decision.SILENCED, 0) + c.get(Decision.OFF, 0)} silenced/off",
    ]
    return f"{verb}: " + ", ".join(parts) + "."


def render_plan(result: RunResult, *, verbose: bool = False) -> str:
    out: list[str] = []
    s = result.summary()
    head = "DRY RUN — nothing was changed" if result.dry_run else f"run {result.run_id}"
    out.append(
        f"oprecon {head} · scope {s['scope']} · {s['records']} records read in "
        f"{s['read_seconds']}s · checks {s['check_seconds']}s"
    )
    if result.plan.guard_tripped:
        out.append(f"MASS-CHANGE GUARD: {result.plan.guard_reason}")
    out.append("")
    by_check = result.plan.by_check()
    if by_check:
        out.append(
            table(
                ["check", "findings", "severity", "title"],
                [
                    (cid, n, BY_ID[cid].severity, BY_ID[cid].title)
                    for cid, n in sorted(by_check.items())
                ],
            )
        )
        out.append("")
    for item in sorted(
        result.plan.items, key=lambda i: (list(Decision).index(i.decision), i.finding.check)
    ):
        f = item.finding
        ids = " ".join(
            f"{k}={v}"
            for k, v in (
                ("patient", f.patient_id),
                ("contact", f.contact_id),
                ("user", f.portal_user_id),
            )
            if v
        )
        out.append(f"  {SYMBOL[item.decision]:>2} {item.decision:<9} {f.check:<30} {ids}")
        out.append(f"       {f.detail}")
        out.append(f"       why: {item.reason}")
        if verbose and item.blocked_by is not None:
            for n, step in enumerate(wait_steps(f, item.blocked_by), 1):
                out.append(f"       {n}. {step}")
        elif verbose and item.decision in (Decision.ALERT, Decision.ESCALATED, Decision.STAGED):
            for n, step in enumerate(REMEDIES[f.check], 1):
                out.append(f"       {n}. {step}")
    if result.plan.items:
        out.append("")
    out.append(summary_line(result))
    return "\n".join(out)


def render_trace(result: RunResult) -> str:
    return "\n".join(f"  {n:>2}. {step}" for n, step in enumerate(result.trace, 1))
