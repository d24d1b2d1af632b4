"""A whole practice: the defect plan, clean households around it, and the run in memory.

Why apart: how many of each defect, and where they fall among the clean households,
is one decision (the patient budget must come out exact); the planters only build.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from worker.devtools.generator.builder import DefectRates, RawRow
from worker.devtools.generator.portal_defects import _PortalDefects
from worker.model.findings import Finding


@dataclass
class PracticeRecords:
    """The whole practice in memory (small sizes only): rows per table in file order."""

    now: datetime
    seed: int
    rows: dict[str, list[Any]]
    findings: list[Finding]
    stats: dict[str, Any]
    # (kind, contact id, contact id): household traps, two people who look like one
    traps: list[tuple[str, str, str]] = field(default_factory=list)

    def records(self, table: str) -> list[Any]:
        """Parsed records of a table, as a correct reader sees them (bad rows dropped)."""
        out = []
        for item in self.rows[table]:
            if isinstance(item, RawRow):
                if item.record is not None:
                    out.append(item.record)
            else:
                out.append(item)
        return out


class _Builder(_PortalDefects):
    """Everything the planters add up to, and the one entry that picks a planter."""

    def defect(self, kind: str, variant: int) -> int:
        before = self.patients_made
        getattr(self, f"_d_{kind}")(variant)
        self.stats[f"defect:{kind}"] += 1
        return self.patients_made - before


DEFECT_KINDS: tuple[str, ...] = tuple(f.name for f in fields(DefectRates))
_RESERVE = 3  # most patients any defect household uses


def _defect_plan(patients: int, rates: DefectRates, rng: random.Random) -> list[tuple[str, int]]:
    households = max(1, patients // 2)
    floor = 1 if patients >= 100 else 0
    per_kind = {k: max(floor, round(getattr(rates, k) * households)) for k in DEFECT_KINDS}
    # Too many for the size asked: trim the biggest kinds first so every patient budget
    # still holds the worst case of what is planned.
    while sum(per_kind.values()) * _RESERVE > patients and any(per_kind.values()):
        biggest = max(per_kind, key=lambda k: (per_kind[k], k))
        per_kind[biggest] -= 1
    plan = [(k, i) for k in DEFECT_KINDS for i in range(per_kind[k])]
    rng.shuffle(plan)
    return plan


def _run(builder: _Builder, patients: int, flush: Any = None, every: int = 512) -> None:
    """Interleave defect households among clean ones until exactly `patients` exist."""
    if patients < 0:
        raise ValueError("patients must be >= 0")
    rng = builder.rng
    plan = _defect_plan(patients, builder.rates, rng)
    remaining = patients
    n = 0
    while remaining > 0 or plan:
        room = remaining - _RESERVE * len(plan)
        if plan and (room <= 0 or rng.random() * (len(plan) + room / 2.2) < len(plan)):
            kind, variant = plan.pop()
            remaining -= builder.defect(kind, variant)
        else:
            remaining -= builder.clean(room)
        n += 1
        if flush is not None and n % every == 0:
            flush()
    if remaining != 0:  # pragma: no cover - the reserve makes this impossible
        raise AssertionError(f"patient budget off by {remaining}")


def _resolve_now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC).replace(microsecond=0)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return now.astimezone(UTC)


def generate_records(patients: int, seed: int = 0, now: datetime | None = None,
                     rates: DefectRates | None = None) -> PracticeRecords:
    """The practice in memory, rows in file order (for tests, SQL and the simulator)."""
    now = _resolve_now(now)
    builder = _Builder(seed, now, rates or DefectRates())
    _run(builder, patients)
    return PracticeRecords(now, seed, builder.out, builder.findings, _stats(builder, patients),
                           builder.traps)


def _stats(b: _Builder, patients: int) -> dict[str, Any]:
    return {
        "patients": patients,
        "findings": dict(sorted((k.split(":", 1)[1], v) for k, v in b.stats.items()
                                if k.startswith("finding:"))),
        "households": dict(sorted((k, v) for k, v in b.stats.items()
                                  if not k.startswith("finding:"))),
        "suppressed_recent": dict(sorted(b.suppressed.items())),
        "op_only_recent": dict(sorted(b.op_only_recent.items())),
    }
