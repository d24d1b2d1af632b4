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
    for f in iter_findings(ctx):
        seen.setdefault(f.fingerprint, f)
    return list(seen.values())
