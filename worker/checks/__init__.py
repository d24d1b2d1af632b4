"""All checks: importing this package registers every one of them."""

from __future__ import annotations

from worker.checks import (  # noqa: F401  (imported to register)
    charts,
    duplicates,
    family,
    invalid,
    links,
    portal,
    welcome,
)
from worker.checks.base import CheckContext, iter_findings
from worker.checks.catalog import BY_ID, CHECK_IDS, SPECS, CheckSpec
from worker.checks.remedies import REMEDIES
from worker.model.findings import Finding

__all__ = ["BY_ID", "CHECK_IDS", "REMEDIES", "SPECS", "CheckContext", "CheckSpec", "run_checks"]


def run_checks(ctx: CheckContext) -> list[Finding]:
    """Every finding for the snapshot, once per fingerprint (the same bad row repeated
    three times is one problem), in a stable order."""
    seen: dict[str, Finding] = {}
    unknown = ctx.snapshot.unknown
    for f in iter_findings(ctx):
        # A comparison with the portal about something a row could not tell us is a
        # guess: drop it (the invalid_record finding says what is unknown and why).
        if f.cross_system and unknown and unknown.about(
                f.patient_id, f.contact_id, f.portal_user_id):
            ctx.suppressed_unknown += 1
            continue
        seen.setdefault(f.fingerprint, f)
    return list(seen.values())
