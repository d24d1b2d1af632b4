"""What every check receives, and the registry that runs them.

A check is a pure function of a `CheckContext` (snapshot + `now` + the time rules)
that yields findings. It never reads a clock, a database or the network, which is what
lets every time rule be tested at its exact boundary.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING

from email_validator import EmailNotValidError, validate_email

from worker.checks.catalog import BY_ID
from worker.model.findings import Action, Finding, Severity
from worker.model.records import FamilyContact
from worker.model.snapshot import FileShares, Snapshot, shares_over

if TYPE_CHECKING:
    from worker.matching.index import Learned

CheckFn = Callable[["CheckContext"], Iterable[Finding]]


@dataclass
class CheckContext:
    snapshot: Snapshot
    now: datetime
    propagation_delay: timedelta = timedelta(minutes=15)
    welcome_window: timedelta = timedelta(days=7)
    duplicate_threshold: float = 0.9  # settings.duplicate_match_threshold
    # Cross-system candidates skipped because an OP record changed too recently.
    suppressed_recent: int = 0
    memo: dict[str, object] = field(default_factory=dict)
    # Above this share of unreadable rows (percent) a file gets one alert and the run
    # plans no fixes; `whole` is False for a partial snapshot (an incremental scan's
    # neighbourhood), whose shares say nothing about the file.
    unreadable_percent: float = 1.0
    unreadable_min_rows: int = 10
    whole: bool = True
    # Findings dropped because they would rest on a row that could not be read.
    suppressed_unknown: int = 0
    # A full scan keeps the duplicate matcher's learned parameters and every contact's
    # blocking keys for incremental scans (worker.matching.index.Learned), here.
    keep_duplicate_index: bool = False
    learned_duplicates: list[Learned] = field(default_factory=list)
    # The unreadable shares a partial run measured outside its snapshot (a shard's whole
    # streams, an incremental scan's changed rows against each file's size): these
    # decide the limit when given, as the snapshot's own shares do for a whole run.
    files: FileShares | None = None
    # Files the last whole read found over the limit, for a partial run that cannot
    # measure them itself: (unreadable, total) as that read counted them.
    carried: dict[str, tuple[int, int]] = field(default_factory=dict)

    def measured_over(self) -> dict[str, tuple[int, int]]:
        """Tables this run itself found with too large a share of unreadable rows:
        (unreadable, total)."""
        over = self.memo.get("measured_over")
        if over is None:
            percent, least = self.unreadable_percent, self.unreadable_min_rows
            if self.files is not None:
                over = shares_over(self.files.shares, percent, least)
            elif self.whole:
                over = self.snapshot.unreadable_over(percent, least)
            else:
                over = {}
            self.memo["measured_over"] = over
        return over  # type: ignore[return-value]

    def over_limit(self) -> dict[str, tuple[int, int]]:
        """Tables over the unreadable limit, as this run measured them or else as the
        last whole read did: one alert for each instead of one per row, no fixes, and
        no finding resolved."""
        return {**self.carried, **self.measured_over()}

    def blind(self, *tables: str) -> bool:
        """Whether the absence of a row from any of `tables` proves nothing this run."""
        blind = self.snapshot.unknown.blind
        return any(t in blind for t in tables)

    def unknown(self, patient_id: str | None = None, contact_id: str | None = None,
                user_id: str | None = None) -> bool:
        return self.snapshot.unknown.about(patient_id, contact_id, user_id)

    def recent(self, *records: object) -> bool:
        """True when any OP record changed within the propagation delay: the portal
        may not show it yet, so comparing the two systems would raise a false alarm."""
        cutoff = self.now - self.propagation_delay
        for record in records:
            updated = getattr(record, "updated_at", None)
            # A blank time may be a change this minute: the conservative reading.
            if updated is None or updated > cutoff:
                return True
        return False

    # -- indexes several checks share, computed once per run (the snapshot is complete
    # by the time a context exists) ------------------------------------------------------

    def sorted_links(self) -> list[tuple[str, str]]:
        """Every portal link, in a stable order (so findings come out in one)."""
        links = self.memo.get("sorted_links")
        if links is None:
            links = self.memo["sorted_links"] = sorted(self.snapshot.links)
        return links  # type: ignore[return-value]

    def authorized_pairs(self) -> set[tuple[str, str]]:
        """(patient id, contact id) of every family contact that grants portal access."""
        pairs = self.memo.get("authorized_pairs")
        if pairs is None:
            snap = self.snapshot
            pairs = self.memo["authorized_pairs"] = {
                (fc.patient_id, fc.contact_id) for fc in snap.family if snap.is_authorized(fc)
            }
        return pairs  # type: ignore[return-value]

    def granting(self) -> list[FamilyContact]:
        """Family contacts that grant portal access to the chart of an active patient,
        in the snapshot's order: who needs a working email, an account and links."""
        fcs = self.memo.get("granting")
        if fcs is None:
            snap = self.snapshot
            fcs = self.memo["granting"] = [
                fc for fc in snap.family
                if snap.is_authorized(fc)
                and (p := snap.patients.get(fc.patient_id)) is not None and p.active
            ]
        return fcs  # type: ignore[return-value]

    def charts_of(self, contact_id: str) -> list[FamilyContact]:
        """`granting()` of one contact."""
        by_contact = self.memo.get("charts_of")
        if by_contact is None:
            index: dict[str, list[FamilyContact]] = {}
            for fc in self.granting():
                index.setdefault(fc.contact_id, []).append(fc)
            by_contact = self.memo["charts_of"] = index
        return by_contact.get(contact_id, [])  # type: ignore[attr-defined]

    def unreadable_contacts(self) -> frozenset[str]:
        """Contact ids named by a contacts row that could not be read: unknown this run,
        so their absence from the snapshot proves nothing."""
        ids = self.memo.get("unreadable_contacts")
        if ids is None:
            ids = self.memo["unreadable_contacts"] = frozenset(
                rec.contact_id for rec in self.snapshot.invalid
                if rec.contact_id and rec.source.split(".")[0] == "contacts"
            )
        return ids  # type: ignore[return-value]

    def skip_recent(self, *records: object) -> bool:
        if self.recent(*records):
            self.suppressed_recent += 1
            return True
        return False


def finding(
    check: str,
    detail: str,
    *,
    severity: Severity | None = None,
    action: Action | None = None,
    **ids: object,
) -> Finding:
    """A finding with the catalog's defaults for `check`."""
    spec = BY_ID[check]
    return Finding(
        check=check,
        severity=severity or spec.severity,
        action=action or spec.action,
        detail=detail,
        fix=spec.fix if (action or spec.action) is Action.FIX else None,
        cross_system=spec.cross_system,
        **ids,  # type: ignore[arg-type]
    )


# A plain ASCII dot-atom local part: letters and digits joined by single . _ + or -.
# email-validator accepts every such local part, so only its domain needs checking.
_PLAIN_LOCAL = re.compile(r"[A-Za-z0-9]+(?:[._+-][A-Za-z0-9]+)*")


def email_is_valid(email: str) -> bool:
    """email-validator's verdict, computed once per domain for the common plain address.

    Validating every address in full costs ~50 µs (IDNA rules on the domain), which at
    100,000 contacts was most of a full scan; a practice's addresses share few domains.
    A local part matching `_PLAIN_LOCAL` passes email-validator whatever the domain, and
    nothing couples the two parts but the total length, which a plain ASCII domain (no
    `xn--` label) keeps through normalization; so the verdict is the domain's. Anything
    else takes the full path.
    """
    local, at, domain = email.rpartition("@")
    if (
        at
        and len(email) <= 254
        and domain.isascii()
        and "xn--" not in domain.lower()
        and len(local) <= 64  # email-validator's limit on the local part
        and _PLAIN_LOCAL.fullmatch(local)
    ):
        return _full_check(f"a@{domain}")
    return _full_check(email)


@lru_cache(maxsize=65536)
def _full_check(email: str) -> bool:
    try:
        validate_email(email, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


REGISTRY: list[tuple[str, CheckFn]] = []


def register(*check_ids: str) -> Callable[[CheckFn], CheckFn]:
    """Add a check function; it may yield findings for any of `check_ids`."""

    def deco(fn: CheckFn) -> CheckFn:
        for cid in check_ids:
            if cid not in BY_ID:
                raise KeyError(f"unknown check id {cid}")
        REGISTRY.append((",".join(check_ids), fn))
        return fn

    return deco


def iter_findings(ctx: CheckContext) -> Iterator[Finding]:
    for _, fn in REGISTRY:
        yield from fn(ctx)
